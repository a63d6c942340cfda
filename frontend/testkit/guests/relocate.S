/* relocate: doorbell rounds at addresses the host chooses while the guest
 * runs (the host moves and removes scratch's region between rounds).
 *
 * Protocol, in guest RAM at DATA (the host writes, the guest polls):
 *   DATA+0x10  round:  the host bumps it to start a round; 0xffffffff ends
 *   DATA+0x14  addr:   the doorbell address for this round
 *   DATA+0x18  writes: how many 32-bit writes of 1 to make
 *   DATA+0x1c  done:   the guest copies `round` here when its writes are made
 * Exit codes: 0 ok. */
        .include "common.S"
        .globl _start
_start:
        xor     %ebx, %ebx              /* the last round served */
1:      mov     round, %eax
        cmp     $0xffffffff, %eax
        je      3f
        cmp     %ebx, %eax
        jne     2f
        pause
        jmp     1b
2:      mov     %eax, %ebx
        mov     addr, %esi
        mov     writes, %ecx
        test    %ecx, %ecx
        jz      5f
4:      movl    $1, (%esi)
        dec     %ecx
        jnz     4b
5:      mov     %ebx, done
        jmp     1b
3:      mov     $msg, %esi
        call    puts
        EXIT    0
        DEFINE_PUTS
msg:    .asciz  "relocate: every round served\n"
        .equ    round, DATA + 0x10
        .equ    addr, DATA + 0x14
        .equ    writes, DATA + 0x18
        .equ    done, DATA + 0x1c
