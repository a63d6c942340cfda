/* Shared definitions and routines of Outboard's guest programs.
 *
 * Machine contract (set up by outboard_testkit::loader):
 *   - 32-bit flat protected mode, paging off; GDT at 0x1000 with a flat code
 *     segment at selector 0x08 and a flat data segment at 0x10.
 *   - The program is loaded at 0x10000 and entered there; EBX holds the vCPU
 *     index; ESP is 0x80000 - 0x10000 * vCPU index.
 *   - A 32-bit OUT to port 0x501 ends the run with that value as exit code.
 *   - MMIO is only ever loaded into or stored from registers (mov, and
 *     cmpxchg8b for 8 bytes), never compared in memory: some nested
 *     hypervisors' instruction emulation gets the flags of `cmp mem` wrong
 *     under load, and plain loads keep the guest portable. Guest RAM that a
 *     device writes (rings, buffers) is loaded into a register before it is
 *     compared too: one run in 40 of the release suite failed a `cmpl` on a
 *     buffer the device had just written.
 *   - Devices sit at the addresses below (the tests and the demo place them
 *     there) and interrupt lines use the GSIs below (8259 PIC, master).
 */
        .code32

        .equ UART,            0x3f8
        .equ UART_LSR,        0x3fd
        .equ EXIT_PORT,       0x501
        .equ SCRATCH,         0xd0000000
        .equ VIRTIO_BLK,      0xd0010000
        .equ VIRTIO_RNG,      0xd0020000
        .equ IDT,             0x2000
        .equ DATA,            0x6000    /* variables live here, away from code */
        .equ GSI_SCRATCH,     3
        .equ GSI_BLK,         5
        .equ GSI_RNG,         6

        /* scratch registers */
        .equ S_ID,            0x000
        .equ S_WRITE_COUNT,   0x010
        .equ S_ACCUM,         0x018
        .equ S_DB0,           0x028
        .equ S_DB0_COUNT,     0x030
        .equ S_IRQ_RAISE,     0x058
        .equ S_LAST_VCPU,     0x080
        .equ S_BANK,          0x100

        .macro EXIT code
        mov     $\code, %eax
        mov     $EXIT_PORT, %dx
        out     %eax, %dx
99:     cli
        hlt
        jmp     99b
        .endm

/* puts: writes the NUL-terminated string at %esi to the UART. */
        .macro DEFINE_PUTS
puts:
        push    %eax
        push    %edx
        mov     $UART, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      pop     %edx
        pop     %eax
        ret
        .endm

/* idt_init: every vector -> fault (exit 0xEE), then loads the IDT.
 * idt_set: vector %eax -> handler %edx (32-bit interrupt gate). */
        .macro DEFINE_IDT
idt_set:
        push    %edi
        lea     IDT(,%eax,8), %edi
        mov     %dx, (%edi)
        movw    $0x08, 2(%edi)
        movb    $0, 4(%edi)
        movb    $0x8e, 5(%edi)
        shr     $16, %edx
        mov     %dx, 6(%edi)
        pop     %edi
        ret
idt_init:
        xor     %eax, %eax
1:      mov     $fault, %edx
        call    idt_set
        inc     %eax
        cmp     $256, %eax
        jb      1b
        lidt    idtr
        ret
fault:
        EXIT    0xee
        .balign 4
idtr:   .word   256 * 8 - 1
        .long   IDT
        .endm

/* isr: counts the interrupt in `count`, ends it at the master PIC and
 * returns to the interrupted EIP with interrupts off. Programs take
 * interrupts only in `sti; hlt` and define `count` and `resume`; the return
 * avoids IRET, which some nested hypervisors cannot emulate in protected
 * mode. */
        .macro DEFINE_COUNTING_ISR
isr:    push    %eax
        incl    count
        mov     $0x20, %al              /* EOI */
        out     %al, $0x20
        pop     %eax
        popl    resume
        add     $8, %esp                /* CS, EFLAGS */
        jmp     *resume
        .endm

/* pic_init: remaps the 8259s to vectors 0x20 (master) and 0x28 (slave) and
 * unmasks the master IRQs whose bits are set in %cl. */
        .macro DEFINE_PIC
pic_init:
        mov     $0x11, %al
        out     %al, $0x20
        out     %al, $0xa0
        mov     $0x20, %al
        out     %al, $0x21
        mov     $0x28, %al
        out     %al, $0xa1
        mov     $0x04, %al
        out     %al, $0x21
        mov     $0x02, %al
        out     %al, $0xa1
        mov     $0x01, %al
        out     %al, $0x21
        out     %al, $0xa1
        mov     %cl, %al
        not     %al
        out     %al, $0x21
        mov     $0xff, %al
        out     %al, $0xa1
        ret
        .endm
