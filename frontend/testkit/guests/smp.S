/* smp: two vCPUs hammer outboard-scratch at once: each adds 1 to ACCUM
 * 5,000 times (posted writes) and reads the ID register after each write.
 * vCPU 0 waits for vCPU 1, then checks the totals (the device must start
 * from reset: the counts are absolute).
 * Finally vCPU 0 writes once more and reads LAST_VCPU: the backend must
 * have learnt that vCPU 0 wrote (per-vCPU user_data tokens).
 * Exit codes: 0 ok; 1 ID read wrong; 2 sum wrong; 3 write count wrong;
 * 4 the backend did not see vCPU 0. */
        .include "common.S"
        .globl _start
_start:
        mov     $SCRATCH, %esi
        test    %ebx, %ebx
        jnz     ap
        call    hammer
1:      cmpl    $1, ap_done             /* wait for vCPU 1 */
        jne     1b
        movl    S_ACCUM(%esi), %ecx
        cmp     $10000, %ecx
        jne     e2
        mov     S_WRITE_COUNT(%esi), %eax  /* the device starts from reset */
        cmp     $10000, %eax
        jne     e3
        cmpl    $0, bad_id
        jne     e1
        movl    $1, S_BANK(%esi)
        movl    S_LAST_VCPU(%esi), %ecx
        cmp     $1, %ecx
        jne     e4
        mov     $msg, %esi
        call    puts
        EXIT    0
ap:     call    hammer
        movl    $1, ap_done
2:      cli
        hlt
        jmp     2b
hammer:
        mov     $5000, %ecx
3:      movl    $1, S_ACCUM(%esi)
        movl    S_ID(%esi), %edx
        cmp     $0x4353424f, %edx
        je      4f
        movl    $1, bad_id
4:      dec     %ecx
        jnz     3b
        ret
e1:     EXIT    1
e2:     EXIT    2
e3:     EXIT    3
e4:     EXIT    4
        DEFINE_PUTS
msg:    .asciz  "smp: two vCPUs, 10000 writes, exact totals\n"
        .equ    ap_done, DATA
        .equ    bad_id, DATA + 4
