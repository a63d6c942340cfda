/* registers: exercises outboard-scratch at 1, 2, 4 and 8 bytes, then sends
 * 10,000 posted writes and proves with one read that all arrived.
 * Exit codes: 0 ok; 1-4 ID read at 1/2/4/8 bytes; 5-8 bank round trip at
 * 1/2/4/8 bytes; 9 sum; 10 write count. */
        .include "common.S"
        .globl _start
_start:
        mov     $SCRATCH, %esi
        /* ID = "OBSCRTCH" little endian */
        cmpb    $0x4f, S_ID(%esi)
        jne     e1
        cmpw    $0x424f, S_ID(%esi)
        jne     e2
        cmpl    $0x4353424f, S_ID(%esi)
        jne     e3
        movq    S_ID(%esi), %xmm0
        movq    %xmm0, tmp
        cmpl    $0x48435452, tmp + 4
        jne     e4
        /* bank round trips */
        movb    $0xa5, S_BANK(%esi)
        cmpb    $0xa5, S_BANK(%esi)
        jne     e5
        movw    $0xbeef, S_BANK + 2(%esi)
        cmpw    $0xbeef, S_BANK + 2(%esi)
        jne     e6
        movl    $0x12345678, S_BANK + 4(%esi)
        cmpl    $0x12345678, S_BANK + 4(%esi)
        jne     e7
        movl    $0x9abcdef0, tmp
        movl    $0x0fedcba9, tmp + 4
        movq    tmp, %xmm1
        movq    %xmm1, S_BANK + 8(%esi)
        movq    S_BANK + 8(%esi), %xmm2
        movq    %xmm2, tmp2
        mov     tmp2, %eax
        cmp     tmp, %eax
        jne     e8
        mov     tmp2 + 4, %eax
        cmp     tmp + 4, %eax
        jne     e8
        /* 10,000 posted writes, then one read that cannot overtake them */
        mov     S_WRITE_COUNT(%esi), %edi
        mov     $1, %ecx
1:      mov     %ecx, S_ACCUM(%esi)
        inc     %ecx
        cmp     $10000, %ecx
        jbe     1b
        cmpl    $50005000, S_ACCUM(%esi)
        jne     e9
        mov     S_WRITE_COUNT(%esi), %eax
        sub     %edi, %eax
        cmp     $10000, %eax
        jne     e10
        mov     $msg, %esi
        call    puts
        EXIT    0
e1:     EXIT    1
e2:     EXIT    2
e3:     EXIT    3
e4:     EXIT    4
e5:     EXIT    5
e6:     EXIT    6
e7:     EXIT    7
e8:     EXIT    8
e9:     EXIT    9
e10:    EXIT    10
        DEFINE_PUTS
msg:    .asciz  "registers: all sizes ok, 10000 posted writes arrived\n"
        .balign 8
tmp:    .quad   0
tmp2:   .quad   0
