/* interrupts: 10,000 times, asks outboard-scratch to raise its edge line
 * (KVM_IRQFD on GSI 3, PIC IRQ 3) and sleeps in hlt until the interrupt has
 * arrived. Exit codes: 0 ok; 1 count mismatch. */
        .include "common.S"
        .globl _start
_start:
        call    idt_init
        mov     $0x20 + GSI_SCRATCH, %eax
        mov     $isr, %edx
        call    idt_set
        mov     $(1 << GSI_SCRATCH), %cl
        call    pic_init
        mov     $SCRATCH, %esi
        xor     %ecx, %ecx
1:      cli
        movl    $1, S_IRQ_RAISE(%esi)
        inc     %ecx
2:      cmp     %ecx, count
        jae     3f
        sti                             /* sti; hlt: no wake-up is lost */
        hlt
        cli
        jmp     2b
3:      cmp     $10000, %ecx
        jb      1b
        cmpl    $10000, count
        jne     bad
        mov     $msg, %esi
        call    puts
        EXIT    0
bad:    EXIT    1
/* Interrupts are only ever taken in the `sti; hlt` of the wait loop, so
 * the handler returns by dropping the frame and jumping to the saved EIP
 * with interrupts still off, which is where the loop re-checks anyway. It
 * avoids IRET, which some nested hypervisors cannot emulate in protected
 * mode. */
        DEFINE_COUNTING_ISR
        DEFINE_IDT
        DEFINE_PIC
        DEFINE_PUTS
msg:    .asciz  "interrupts: 10000 raised by the backend, 10000 taken\n"
        .equ    count, DATA
        .equ    resume, DATA + 4
