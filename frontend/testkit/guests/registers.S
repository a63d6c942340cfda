/* registers: exercises outboard-scratch at 1, 2, 4 and 8 bytes, then sends
 * 10,000 posted writes and proves with one read that all arrived.
 * Exit codes: 0 ok; 1-4 ID read at 1/2/4/8 bytes; 5-8 bank round trip at
 * 1/2/4/8 bytes; 9 sum; 10 write count. */
        .include "common.S"
        .globl _start
_start:
        mov     $SCRATCH, %esi
        /* ID = "OBSCRTCH" little endian */
        movb    S_ID(%esi), %cl
        cmp     $0x4f, %cl
        jne     e1
        movw    S_ID(%esi), %cx
        cmp     $0x424f, %cx
        jne     e2
        movl    S_ID(%esi), %ecx
        cmp     $0x4353424f, %ecx
        jne     e3
        /* 8 bytes in 32-bit code: cmpxchg8b with a value that cannot match
         * reads the register in one 8-byte access (SSE moves are not
         * emulated for MMIO on every host). */
        xor     %eax, %eax
        xor     %edx, %edx
        xor     %ebx, %ebx
        xor     %ecx, %ecx
        cmpxchg8b S_ID(%esi)
        cmp     $0x4353424f, %eax
        jne     e4
        cmp     $0x48435452, %edx
        jne     e4
        /* bank round trips */
        movb    $0xa5, S_BANK(%esi)
        movb    S_BANK(%esi), %cl
        cmp     $0xa5, %cl
        jne     e5
        movw    $0xbeef, S_BANK + 2(%esi)
        movw    S_BANK + 2(%esi), %cx
        cmp     $0xbeef, %cx
        jne     e6
        movl    $0x12345678, S_BANK + 4(%esi)
        movl    S_BANK + 4(%esi), %ecx
        cmp     $0x12345678, %ecx
        jne     e7
        /* 8-byte write: read the old value into EDX:EAX (a match writes the
         * same value back, ECX:EBX = EDX:EAX = 0), then swap in ECX:EBX */
        xor     %eax, %eax
        xor     %edx, %edx
        xor     %ebx, %ebx
        xor     %ecx, %ecx
        cmpxchg8b S_BANK + 8(%esi)
        mov     $0x9abcdef0, %ebx
        mov     $0x0fedcba9, %ecx
        cmpxchg8b S_BANK + 8(%esi)      /* checked by the read-back below */
        xor     %eax, %eax
        xor     %edx, %edx
        xor     %ebx, %ebx
        xor     %ecx, %ecx
        cmpxchg8b S_BANK + 8(%esi)
        cmp     $0x9abcdef0, %eax
        jne     e8
        cmp     $0x0fedcba9, %edx
        jne     e8
        /* 10,000 posted writes, then one read that cannot overtake them */
        mov     S_WRITE_COUNT(%esi), %edi
        mov     $1, %ecx
1:      mov     %ecx, S_ACCUM(%esi)
        inc     %ecx
        cmp     $10000, %ecx
        jbe     1b
        movl    S_ACCUM(%esi), %ecx
        cmp     $50005000, %ecx
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
