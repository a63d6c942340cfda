/* echo: reads one typed line from the UART, woken by the UART's interrupt
 * (received-data-available, KVM_IRQFD on GSI 4 = PIC IRQ 4), and prints it
 * back as "echo: LINE". It writes 1 to DATA+0x20 once it waits for input,
 * so the host knows when to type.
 * Exit codes: 0 ok; 1 no interrupt counted; 2 too long. */
        .include "common.S"
        .globl _start
        .equ    GSI_UART, 4
        .equ    UART_IER, 0x3f9
        .equ    UART_MCR, 0x3fc
        .equ    LINE_MAX, 200
_start:
        call    idt_init
        mov     $0x20 + GSI_UART, %eax
        mov     $isr, %edx
        call    idt_set
        mov     $(1 << GSI_UART), %cl
        call    pic_init
        mov     $0x08, %al              /* MCR: OUT2 gates the IRQ line */
        mov     $UART_MCR, %dx
        out     %al, %dx
        mov     $0x01, %al              /* IER: received data available */
        mov     $UART_IER, %dx
        out     %al, %dx
        movl    $1, ready
        mov     $line, %edi
        xor     %ecx, %ecx              /* bytes so far */
        xor     %ebx, %ebx              /* interrupts seen so far */
        /* Wait for the UART's interrupt, then drain the FIFO; wait again
         * when it runs dry. Bytes are read only after an interrupt. */
1:      cli
        mov     count, %edx
        cmp     %edx, %ebx
        jne     2f
        sti                             /* sti; hlt: no wake-up is lost */
        hlt
        jmp     1b
2:      mov     count, %ebx
4:      mov     $UART_LSR, %dx
        in      %dx, %al
        test    $1, %al                 /* data ready */
        jz      1b
        mov     $UART, %dx
        in      %dx, %al
        cmp     $10, %al
        je      3f
        mov     %al, (%edi,%ecx)
        inc     %ecx
        cmp     $LINE_MAX, %ecx
        jb      4b
        EXIT    2
3:      movb    $10, (%edi,%ecx)
        movb    $0, 1(%edi,%ecx)
        mov     $prefix, %esi
        call    puts
        mov     $line, %esi
        call    puts
        cmpl    $0, count
        je      bad
        EXIT    0
bad:    EXIT    1
/* Taken only in the `sti; hlt` above; returns without IRET (see
 * interrupts.S). */
        DEFINE_COUNTING_ISR
        DEFINE_IDT
        DEFINE_PIC
        DEFINE_PUTS
prefix: .asciz  "echo: "
        .equ    count, DATA
        .equ    resume, DATA + 4
        .equ    ready, DATA + 0x20
        .equ    line, DATA + 0x100
