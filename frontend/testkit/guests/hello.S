/* hello: prints a greeting through outboard-uart and exits with code 0. */
        .include "common.S"
        .globl _start
_start:
        mov     $msg, %esi
        call    puts
        mov     $UART_LSR, %dx          /* ordered after the posted writes */
        in      %dx, %al
        EXIT    0
        DEFINE_PUTS
msg:    .asciz  "Hello from a KVM guest, through the outboard-uart backend!\n"
