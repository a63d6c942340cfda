/* bench: a measurement loop driven by parameters the frontend writes at
 * DATA before the run: +0 mode (0: 32-bit MMIO reads, 1: 32-bit MMIO writes
 * of 1), +4 address, +8 count. Exits with code 0. */
        .include "common.S"
        .globl _start
_start:
        mov     DATA + 4, %esi
        mov     DATA + 8, %ecx
        test    %ecx, %ecx
        jz      3f
        cmpl    $0, DATA
        jne     2f
1:      mov     (%esi), %eax
        dec     %ecx
        jnz     1b
        jmp     3f
2:      movl    $1, (%esi)
        dec     %ecx
        jnz     2b
3:      EXIT    0
