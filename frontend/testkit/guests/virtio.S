/* virtio: a minimal virtio-mmio driver in guest code. It initializes
 * outboard-virtio-blk and outboard-virtio-rng (reset, VERSION_1, one queue of
 * 8 entries in guest RAM, DRIVER_OK), reads sectors 0 and 1 of the disk and
 * 64 random bytes, ringing QueueNotify (a KVM ioeventfd: no exit) and
 * sleeping in hlt until the device's interrupt (KVM_IRQFD, PIC IRQ 5 / 6).
 * The disk must start with "OUTBOARD" in sector 0 and "SECTOR-1" in sector 1.
 * Exit codes: 0 ok; 1x blk init step x; 2x rng init step x; 30 blk status;
 * 31 sector 0 data; 32 sector 1 data; 40 rng length; 41 rng all zero. */
        .include "common.S"

        .equ BLK_RING,  0x200000        /* desc +0, avail +0x80, used +0x100 */
        .equ BLK_HDR,   0x200200
        .equ BLK_STAT,  0x200210
        .equ BLK_DATA,  0x201000
        .equ RNG_RING,  0x300000
        .equ RNG_DATA,  0x301000

        .globl _start
_start:
        call    idt_init
        mov     $0x20 + GSI_BLK, %eax
        mov     $isr_blk, %edx
        call    idt_set
        mov     $0x20 + GSI_RNG, %eax
        mov     $isr_rng, %edx
        call    idt_set
        mov     $((1 << GSI_BLK) | (1 << GSI_RNG)), %cl
        call    pic_init

        /* virtio-blk */
        mov     $VIRTIO_BLK, %esi
        mov     $BLK_RING, %edi
        mov     $2, %eax
        call    vinit
        test    %eax, %eax
        jz      1f
        add     $10, %eax
        jmp     fail
1:      xor     %ebp, %ebp              /* sector 0 */
        call    blk_read
        mov     BLK_DATA, %edx
        cmp     $0x4254554f, %edx       /* "OUTB" */
        jne     e31
        mov     BLK_DATA + 4, %edx
        cmp     $0x4452414f, %edx       /* "OARD" */
        jne     e31
        mov     $1, %ebp
        call    blk_read
        mov     BLK_DATA, %edx
        cmp     $0x54434553, %edx       /* "SECT" */
        jne     e32
        mov     BLK_DATA + 4, %edx
        cmp     $0x312d524f, %edx       /* "OR-1" */
        jne     e32

        /* virtio-rng */
        mov     $VIRTIO_RNG, %esi
        mov     $RNG_RING, %edi
        mov     $4, %eax
        call    vinit
        test    %eax, %eax
        jz      2f
        add     $20, %eax
        jmp     fail
2:      /* one device-writable descriptor of 64 bytes */
        movl    $RNG_DATA, 0(%edi)
        movl    $0, 4(%edi)
        movl    $64, 8(%edi)
        movw    $2, 12(%edi)
        movw    $0, 14(%edi)
        call    submit_and_wait
        mov     0x108(%edi), %edx       /* used.ring[0].len */
        cmp     $64, %edx
        jne     e40
        mov     $RNG_DATA, %ebx
        xor     %eax, %eax
        mov     $16, %ecx
3:      or      (%ebx), %eax
        add     $4, %ebx
        dec     %ecx
        jnz     3b
        test    %eax, %eax
        jz      e41

        mov     $msg, %esi
        call    puts
        EXIT    0

/* vinit: device at %esi, rings at %edi, expected device ID in %eax.
 * Returns %eax = 0, or the failing step (1-6). */
vinit:
        movl    0x000(%esi), %ecx
        cmp     $0x74726976, %ecx
        jne     9f
        movl    0x004(%esi), %ecx
        cmp     $2, %ecx
        jne     8f
        mov     0x008(%esi), %ecx
        cmp     %ecx, %eax
        jne     7f
        movl    $0, 0x070(%esi)                 /* reset */
        movl    $3, 0x070(%esi)                 /* ACKNOWLEDGE | DRIVER */
        movl    $1, 0x024(%esi)                 /* driver features, high word */
        movl    $1, 0x020(%esi)                 /* VIRTIO_F_VERSION_1 */
        movl    $0, 0x024(%esi)
        movl    $0, 0x020(%esi)
        movl    $11, 0x070(%esi)                /* | FEATURES_OK */
        movl    0x070(%esi), %ecx
        test     $8, %ecx
        jz      6f
        movl    $0, 0x030(%esi)                 /* queue 0 */
        movl    0x034(%esi), %ecx
        cmp     $8, %ecx
        jb      5f
        movl    $8, 0x038(%esi)
        mov     %edi, 0x080(%esi)
        movl    $0, 0x084(%esi)
        lea     0x80(%edi), %eax
        mov     %eax, 0x090(%esi)
        movl    $0, 0x094(%esi)
        lea     0x100(%edi), %eax
        mov     %eax, 0x0a0(%esi)
        movl    $0, 0x0a4(%esi)
        movl    $1, 0x044(%esi)                 /* QueueReady */
        movl    $15, 0x070(%esi)                /* | DRIVER_OK */
        xor     %eax, %eax
        ret
5:      mov     $5, %eax
        ret
6:      mov     $4, %eax
        ret
7:      mov     $3, %eax
        ret
8:      mov     $2, %eax
        ret
9:      mov     $1, %eax
        ret

/* blk_read: reads sector %ebp into BLK_DATA (512 bytes). */
blk_read:
        movl    $0, BLK_HDR                     /* VIRTIO_BLK_T_IN */
        movl    $0, BLK_HDR + 4
        mov     %ebp, BLK_HDR + 8
        movl    $0, BLK_HDR + 12
        movb    $0xff, BLK_STAT
        movl    $BLK_HDR, 0(%edi)               /* desc 0: header */
        movl    $0, 4(%edi)
        movl    $16, 8(%edi)
        movw    $1, 12(%edi)                    /* NEXT */
        movw    $1, 14(%edi)
        movl    $BLK_DATA, 16(%edi)             /* desc 1: data */
        movl    $0, 20(%edi)
        movl    $512, 24(%edi)
        movw    $3, 28(%edi)                    /* NEXT | WRITE */
        movw    $2, 30(%edi)
        movl    $BLK_STAT, 32(%edi)             /* desc 2: status */
        movl    $0, 36(%edi)
        movl    $1, 40(%edi)
        movw    $2, 44(%edi)                    /* WRITE */
        movw    $0, 46(%edi)
        call    submit_and_wait
        movzbl  BLK_STAT, %edx
        test    %edx, %edx
        jne     e30
        ret

/* submit_and_wait: makes descriptor 0 available on the queue at %edi of
 * the device at %esi, notifies, and sleeps until the used index catches up. */
submit_and_wait:
        movzwl  0x82(%edi), %eax                /* avail.idx */
        mov     %eax, %ecx
        and     $7, %ecx
        movw    $0, 0x84(%edi,%ecx,2)           /* avail.ring[idx % 8] = 0 */
        inc     %eax
        movw    %ax, 0x82(%edi)                 /* publish */
        cli
        movl    $0, 0x050(%esi)                 /* QueueNotify: an ioeventfd */
1:      movzwl  0x102(%edi), %edx               /* used.idx */
        cmp     %ax, %dx
        je      2f
        sti                                     /* sti; hlt: no wake-up is lost */
        hlt
        cli
        jmp     1b
2:      sti
        ret

/* Interrupts are only taken in the `sti; hlt` of submit_and_wait, so the
 * handlers return by dropping the frame and jumping to the saved EIP with
 * interrupts off (see guests/interrupts.S: no IRET, which some nested
 * hypervisors cannot emulate in protected mode). */
isr_blk:
        push    %eax
        mov     VIRTIO_BLK + 0x060, %eax        /* InterruptStatus */
        mov     %eax, VIRTIO_BLK + 0x064        /* InterruptACK */
        jmp     eoi
isr_rng:
        push    %eax
        mov     VIRTIO_RNG + 0x060, %eax
        mov     %eax, VIRTIO_RNG + 0x064
eoi:    mov     $0x20, %al
        out     %al, $0x20
        pop     %eax
        popl    resume
        add     $8, %esp                        /* CS, EFLAGS */
        jmp     *resume

fail:   mov     $EXIT_PORT, %dx
        out     %eax, %dx
        cli
        hlt
e30:    EXIT    30
e31:    EXIT    31
e32:    EXIT    32
e40:    EXIT    40
e41:    EXIT    41
        DEFINE_IDT
        DEFINE_PIC
        DEFINE_PUTS
        .equ    resume, DATA
msg:    .asciz  "virtio: read sectors 0 and 1 from virtio-blk and 64 bytes from virtio-rng\n"
