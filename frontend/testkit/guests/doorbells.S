/* doorbells: 100,000 writes to scratch doorbell 0 (an ioeventfd: they never
 * leave the kernel), then waits until the backend has counted them all.
 * Exit codes: 0 ok. */
        .include "common.S"
        .globl _start
_start:
        mov     $SCRATCH, %esi
        mov     $100000, %ecx
1:      movl    $1, S_DB0(%esi)
        dec     %ecx
        jnz     1b
2:      movl    S_DB0_COUNT(%esi), %ecx
        cmp     $100000, %ecx
        jb      2b
        mov     $msg, %esi
        call    puts
        EXIT    0
        DEFINE_PUTS
msg:    .asciz  "doorbells: 100000 rings counted by the backend\n"
