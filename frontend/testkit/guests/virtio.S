/* virtio: a minimal virtio-mmio driver in guest code, for
 * outboard-virtio-blk and outboard-virtio-rng. Each device gets: reset,
 * feature negotiation, one queue of 8 entries in guest RAM, DRIVER_OK.
 * Notifications are QueueNotify writes (KVM ioeventfds: no exit);
 * interrupts arrive by KVM_IRQFD on PIC IRQ 5 (blk) and 6 (rng) and are
 * awaited in `sti; hlt`.
 *
 * virtio-blk negotiates VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
 * VIRTIO_RING_F_EVENT_IDX and VIRTIO_BLK_F_SEG_MAX (and needs seg_max >=
 * 126). Every request is one ring descriptor with VRING_DESC_F_INDIRECT
 * pointing at a table of header, 512-byte data segments and status:
 *   1. reads sectors 0 and 1 (a table of 4) and checks "OUTBOARD" and
 *      "SECTOR-1", interrupt-driven;
 *   2. writes sectors 1000-1125 in 126 segments (a table of 128 descriptors,
 *      a chain 16 times the queue size), each sector's dword i holding
 *      (sector << 16) | i, from buffers scattered 1 KiB apart in a permuted
 *      order, interrupt-driven;
 *   3. reads them back in 126 segments into other permuted buffers, with
 *      used_event set 0x8000 ahead: it polls the used ring, and the device
 *      must not have raised an interrupt; every dword of every segment is
 *      checked, and the canary on either side of each buffer;
 *   4. builds that read and the one of step 1, then submits them back to
 *      back: the second notifies only if vring_need_event says so (not
 *      while the device is still draining the first), then sleeps until
 *      both are used.
 * Event-idx, per virtio 1.2 2.7.7 and 2.7.10: in the interrupt-driven
 * steps the driver sets used_event to the used entries it has consumed
 * before it submits (so the device must interrupt once it uses one more),
 * and before each sleep to the used index it has seen, looking at the used
 * index again after a full barrier. It notifies only when
 * vring_need_event(avail_event, new, old) holds, reading avail_event after
 * a full barrier. After each completion it reads InterruptStatus (and acks
 * it): the device serves its single ready queue in its event loop, which
 * answers that read only after the drain that used the request, so by then
 * avail_event must equal the driver's avail index and InterruptStatus (or
 * the interrupt handler, which also reads it) shows whether the device
 * raised a used-buffer interrupt.
 *
 * virtio-rng negotiates VERSION_1 only, so the device's other path runs
 * too (no event-idx: an interrupt per used batch): 64 random bytes.
 *
 * The disk must start with "OUTBOARD" in sector 0 and "SECTOR-1" in sector
 * 1 and hold at least 1126 sectors; sectors 1000-1125 are overwritten.
 * Counters for the host, at BLK_RING + 0x814 and + 0x818 (u32): the
 * QueueNotify writes made and the ones vring_need_event made unnecessary.
 *
 * Exit codes: 0 ok; 1x blk init step x, 2x rng init step x (1 magic,
 * 2 version, 3 device ID, 4 FEATURES_OK refused, 5 QueueNumMax below 8,
 * 6 a wanted feature not offered: INDIRECT_DESC, EVENT_IDX, SEG_MAX or
 * VERSION_1); 17 blk seg_max below 126; 30 blk status not OK; 31 sector 0
 * data; 32 sector 1 data; 33 used element (unknown id or wrong length);
 * 34 read-back data (a segment's bytes wrong or in the wrong buffer);
 * 35 canary beside a read buffer overwritten; 36 avail_event not equal to
 * the avail index after a completion; 37 no used-buffer interrupt although
 * used_event asked for one; 38 a used-buffer interrupt although used_event
 * was far ahead; 40 rng length; 41 rng all zero. */
        .include "common.S"

        /* virtio-mmio registers (virtio 1.2 4.2.2) */
        .equ DEV_FEATURES,      0x010
        .equ DEV_FEATURES_SEL,  0x014
        .equ DRV_FEATURES,      0x020
        .equ DRV_FEATURES_SEL,  0x024
        .equ QUEUE_NOTIFY,      0x050
        .equ INT_STATUS,        0x060
        .equ INT_ACK,           0x064
        .equ BLK_SEG_MAX,       0x10c   /* config space + 12 */

        /* feature bits (low word; VERSION_1 is bit 0 of the high word) */
        .equ F_BLK_SEG_MAX,     1 << 2
        .equ F_INDIRECT_DESC,   1 << 28
        .equ F_EVENT_IDX,       1 << 29

        .equ D_NEXT,            1
        .equ D_WRITE,           2
        .equ D_INDIRECT,        4

        /* a queue of 8: descriptors, avail and used rings, event fields */
        .equ QSIZE,             8
        .equ AVAIL_IDX,         0x82
        .equ AVAIL_RING,        0x84
        .equ USED_EVENT,        0x94    /* avail + 4 + 2 * QSIZE */
        .equ USED_IDX,          0x102
        .equ USED_RING,         0x104
        .equ AVAIL_EVENT,       0x144   /* used + 4 + 8 * QSIZE */
        /* driver state beside the rings (the device never looks there) */
        .equ ST_AVAIL,          0x800   /* avail index published */
        .equ ST_KICKED,         0x804   /* avail index at the last notify decision */
        .equ ST_LAST_USED,      0x808   /* used entries consumed */
        .equ ST_IRQ_BITS,       0x80c   /* InterruptStatus bits seen */
        .equ ST_IRQS,           0x810   /* interrupts taken */
        .equ ST_NOTIFIES,       0x814
        .equ ST_SKIPPED,        0x818

        .equ BLK_RING,  0x200000
        .equ BLK_DATA,  0x201000        /* sector 0 at +0, sector 1 at +0x400 */
        .equ BLK_REQ,   0x203000        /* per slot (0x20): header, status +16, used len +20 */
        .equ BLK_TABLES,0x204000        /* per slot (0x800): 128 descriptors */
        .equ WBUF,      0x220000        /* 126 segment buffers 1 KiB apart */
        .equ RBUF,      0x240000
        .equ RNG_RING,  0x300000
        .equ RNG_DATA,  0x301000

        .equ SEGS,      126
        .equ SECTOR0,   1000            /* first sector of the 126-segment requests */
        .equ CANARY,    0xa5a5a5a5
        .equ T_IN,      0
        .equ T_OUT,     1

        /* request parameters for blk_request */
        .equ req_type,  DATA + 0x10
        .equ req_sector,DATA + 0x14
        .equ req_segs,  DATA + 0x18
        .equ req_buf,   DATA + 0x1c
        .equ req_mult,  DATA + 0x20     /* segment k's buffer: k * mult mod segs */

        .macro REQUEST type, sector, segs, buf, mult, slot
        movl    $\type, req_type
        movl    $\sector, req_sector
        movl    $\segs, req_segs
        movl    $\buf, req_buf
        movl    $\mult, req_mult
        mov     $\slot, %eax
        call    blk_request
        .endm

        /* makes slot's request available, then notifies if need be */
        .macro SUBMIT slot
        mov     $\slot, %eax
        call    publish
        call    kick
        .endm

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
        mov     $(F_INDIRECT_DESC | F_EVENT_IDX | F_BLK_SEG_MAX), %ebx
        call    vinit
        test    %eax, %eax
        jz      1f
        add     $10, %eax
        jmp     fail
1:      mov     BLK_SEG_MAX(%esi), %eax
        cmp     $SEGS, %eax
        jb      e17

        /* 1: sectors 0 and 1, interrupt-driven */
        call    want_irq
        REQUEST T_IN, 0, 2, BLK_DATA, 1, 0
        SUBMIT  0
        mov     $1, %eax
        call    wait_irq
        call    completed_with_irq
        mov     $0, %eax
        mov     $(2 * 512 + 1), %ecx
        call    check_req
        call    check_sectors_0_1

        /* 2: 126 segments written from scattered buffers, interrupt-driven */
        call    fill_pattern
        call    want_irq
        REQUEST T_OUT, SECTOR0, SEGS, WBUF, 5, 1
        SUBMIT  1
        mov     $2, %eax
        call    wait_irq
        call    completed_with_irq
        mov     $1, %eax
        mov     $1, %ecx
        call    check_req

        /* 3: read back with used_event far ahead: polled, no interrupt */
        call    fill_canary
        mov     ST_LAST_USED(%edi), %eax
        add     $0x8000, %eax
        mov     %ax, USED_EVENT(%edi)
        REQUEST T_IN, SECTOR0, SEGS, RBUF, 11, 2
        SUBMIT  2
        mov     $3, %eax
        call    wait_poll
        call    settle
        mov     ST_IRQ_BITS(%edi), %eax
        test    $1, %eax
        jnz     e38
        call    check_avail_event
        call    reap
        mov     $2, %eax
        mov     $(SEGS * 512 + 1), %ecx
        call    check_req
        call    check_read_back

        /* 4: two requests back to back, then sleep until both are used */
        call    fill_canary
        call    want_irq
        REQUEST T_IN, SECTOR0, SEGS, RBUF, 11, 3
        REQUEST T_IN, 0, 2, BLK_DATA, 1, 4
        SUBMIT  3
        SUBMIT  4
        mov     $5, %eax
        call    wait_irq
        call    completed_with_irq
        mov     $3, %eax
        mov     $(SEGS * 512 + 1), %ecx
        call    check_req
        mov     $4, %eax
        mov     $(2 * 512 + 1), %ecx
        call    check_req
        call    check_read_back
        call    check_sectors_0_1

        /* virtio-rng: VERSION_1 only */
        mov     $VIRTIO_RNG, %esi
        mov     $RNG_RING, %edi
        mov     $4, %eax
        xor     %ebx, %ebx
        call    vinit
        test    %eax, %eax
        jz      2f
        add     $20, %eax
        jmp     fail
2:      /* one device-writable descriptor of 64 bytes */
        movl    $RNG_DATA, 0(%edi)
        movl    $0, 4(%edi)
        movl    $64, 8(%edi)
        movw    $D_WRITE, 12(%edi)
        movw    $0, 14(%edi)
        call    submit_and_wait
        mov     USED_RING + 4(%edi), %edx       /* used.ring[0].len */
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

/* vinit: device at %esi, rings at %edi (zeroed here, with the driver
 * state), expected device ID in %eax, low feature bits wanted besides
 * VERSION_1 in %ebx. Returns %eax = 0, or the failing step (1-6). */
vinit:
        push    %edi
        mov     $0x1000 / 4, %ecx
        xor     %edx, %edx
1:      mov     %edx, (%edi)
        add     $4, %edi
        dec     %ecx
        jnz     1b
        pop     %edi
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
        movl    $1, DEV_FEATURES_SEL(%esi)
        mov     DEV_FEATURES(%esi), %ecx
        test    $1, %ecx                        /* VIRTIO_F_VERSION_1 */
        jz      4f
        movl    $0, DEV_FEATURES_SEL(%esi)
        mov     DEV_FEATURES(%esi), %ecx
        and     %ebx, %ecx
        cmp     %ebx, %ecx
        jne     4f
        movl    $1, DRV_FEATURES_SEL(%esi)
        movl    $1, DRV_FEATURES(%esi)
        movl    $0, DRV_FEATURES_SEL(%esi)
        mov     %ebx, DRV_FEATURES(%esi)
        movl    $11, 0x070(%esi)                /* | FEATURES_OK */
        movl    0x070(%esi), %ecx
        test    $8, %ecx
        jz      6f
        movl    $0, 0x030(%esi)                 /* queue 0 */
        movl    0x034(%esi), %ecx
        cmp     $QSIZE, %ecx
        jb      5f
        movl    $QSIZE, 0x038(%esi)
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
4:      mov     $6, %eax
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

/* blk_request: builds the request in slot %eax (0-7: header, status and
 * indirect table of its own) from req_* and points ring descriptor %eax at
 * the table. */
blk_request:
        pusha
        mov     %eax, %ebp
        shl     $5, %ebp
        add     $BLK_REQ, %ebp                  /* %ebp = header */
        mov     req_type, %ecx
        mov     %ecx, 0(%ebp)
        movl    $0, 4(%ebp)
        mov     req_sector, %ecx
        mov     %ecx, 8(%ebp)
        movl    $0, 12(%ebp)
        movb    $0xff, 16(%ebp)                 /* status */
        movl    $0xffffffff, 20(%ebp)           /* used length, from reap */
        mov     %eax, %edx
        shl     $11, %edx
        add     $BLK_TABLES, %edx               /* %edx = table */
        mov     %ebp, 0(%edx)                   /* [0] header */
        movl    $0, 4(%edx)
        movl    $16, 8(%edx)
        movl    $(D_NEXT | (1 << 16)), 12(%edx) /* NEXT, next 1 */
        mov     $D_NEXT, %esi
        mov     req_type, %ecx
        cmp     $T_IN, %ecx
        jne     1f
        or      $D_WRITE, %esi                  /* the device fills a read's buffers */
1:      xor     %ecx, %ecx                      /* segment k */
        xor     %edi, %edi                      /* its buffer: k * mult mod segs */
        lea     16(%edx), %ebx                  /* [k + 1] */
2:      mov     %edi, %eax
        shl     $10, %eax
        add     req_buf, %eax
        mov     %eax, 0(%ebx)
        movl    $0, 4(%ebx)
        movl    $512, 8(%ebx)
        lea     2(%ecx), %eax                   /* next k + 2 */
        shl     $16, %eax
        or      %esi, %eax
        mov     %eax, 12(%ebx)
        add     req_mult, %edi
3:      cmp     req_segs, %edi
        jb      4f
        sub     req_segs, %edi
        jmp     3b
4:      add     $16, %ebx
        inc     %ecx
        cmp     req_segs, %ecx
        jb      2b
        lea     16(%ebp), %eax                  /* [segs + 1] status */
        mov     %eax, 0(%ebx)
        movl    $0, 4(%ebx)
        movl    $1, 8(%ebx)
        movl    $D_WRITE, 12(%ebx)
        add     $16, %ebx
        sub     %edx, %ebx                      /* table length in bytes */
        mov     28(%esp), %eax                  /* the slot (pusha's %eax) */
        mov     %eax, %ecx
        shl     $4, %ecx
        add     $BLK_RING, %ecx                 /* ring descriptor [slot] */
        mov     %edx, 0(%ecx)
        movl    $0, 4(%ecx)
        mov     %ebx, 8(%ecx)
        movl    $D_INDIRECT, 12(%ecx)           /* INDIRECT, no NEXT */
        popa
        ret

/* publish: puts head %eax in the avail ring at %edi and bumps its index
 * (x86 keeps the stores in order: the entry is visible first). */
publish:
        mov     ST_AVAIL(%edi), %ecx
        mov     %ecx, %edx
        and     $QSIZE - 1, %edx
        mov     %ax, AVAIL_RING(%edi,%edx,2)
        inc     %ecx
        movzwl  %cx, %ecx
        mov     %ecx, ST_AVAIL(%edi)
        mov     %cx, AVAIL_IDX(%edi)
        ret

/* kick: notifies the device at %esi about the queue at %edi if
 * vring_need_event(avail_event, new, old): (u16)(new - event - 1) <
 * (u16)(new - old), old being the avail index at the last decision. */
kick:
        lock; orl $0, (%esp)                    /* avail index out before avail_event is read */
        movzwl  AVAIL_EVENT(%edi), %edx         /* event */
        mov     ST_AVAIL(%edi), %eax            /* new */
        mov     ST_KICKED(%edi), %ecx           /* old */
        mov     %eax, ST_KICKED(%edi)
        neg     %ecx
        add     %eax, %ecx
        movzwl  %cx, %ecx                       /* new - old */
        sub     %edx, %eax
        dec     %eax
        movzwl  %ax, %eax                       /* new - event - 1 */
        cmp     %ecx, %eax
        jae     1f
        movl    $0, QUEUE_NOTIFY(%esi)          /* queue 0: an ioeventfd */
        incl    ST_NOTIFIES(%edi)
        ret
1:      incl    ST_SKIPPED(%edi)
        ret

/* want_irq: used_event = the used entries consumed: the device interrupts
 * once its used index moves past them. */
want_irq:
        mov     ST_LAST_USED(%edi), %eax
        mov     %ax, USED_EVENT(%edi)
        ret

/* wait_irq: sleeps until the used index of the queue at %edi reaches %eax,
 * asking for an interrupt with used_event = the used index seen; returns
 * with interrupts off. */
wait_irq:
        cli
1:      movzwl  USED_IDX(%edi), %edx
        cmp     %ax, %dx
        je      2f
        mov     %dx, USED_EVENT(%edi)
        lock; orl $0, (%esp)                    /* used_event out before used.idx is read again */
        movzwl  USED_IDX(%edi), %ecx
        cmp     %cx, %dx
        jne     1b                              /* it moved meanwhile */
        sti                                     /* sti; hlt: no wake-up is lost */
        hlt
        cli
        jmp     1b
2:      ret

/* wait_poll: spins with interrupts off until the used index reaches %eax. */
wait_poll:
        cli
1:      movzwl  USED_IDX(%edi), %edx
        cmp     %ax, %dx
        je      2f
        pause
        jmp     1b
2:      ret

/* settle: reads and acks InterruptStatus of the device at %esi, recording
 * its bits in the driver state of the queue at %edi. */
settle:
        mov     INT_STATUS(%esi), %eax
        test    %eax, %eax
        jz      1f
        mov     %eax, INT_ACK(%esi)
        or      %eax, ST_IRQ_BITS(%edi)
1:      ret

/* completed_with_irq: after an interrupt-driven wait, the device must have
 * raised a used-buffer interrupt (taken, or still latched) and published
 * avail_event; then consumes the used ring. */
completed_with_irq:
        call    settle
        mov     ST_IRQ_BITS(%edi), %eax
        test    $1, %eax
        jz      e37
        movl    $0, ST_IRQ_BITS(%edi)
        call    check_avail_event
        jmp     reap

check_avail_event:
        movzwl  AVAIL_EVENT(%edi), %edx
        mov     ST_AVAIL(%edi), %eax
        cmp     %ax, %dx
        jne     e36
        ret

/* reap: records the length of every new used element in its slot. */
reap:
        movzwl  USED_IDX(%edi), %edx
1:      mov     ST_LAST_USED(%edi), %ecx
        cmp     %cx, %dx
        je      2f
        and     $QSIZE - 1, %ecx
        mov     USED_RING(%edi,%ecx,8), %eax    /* id */
        cmp     $QSIZE, %eax
        jae     e33
        mov     USED_RING + 4(%edi,%ecx,8), %ecx        /* len */
        shl     $5, %eax
        mov     %ecx, BLK_REQ + 20(%eax)
        mov     ST_LAST_USED(%edi), %ecx
        inc     %ecx
        movzwl  %cx, %ecx
        mov     %ecx, ST_LAST_USED(%edi)
        jmp     1b
2:      ret

/* check_req: slot %eax completed with status OK and used length %ecx. */
check_req:
        shl     $5, %eax
        movzbl  BLK_REQ + 16(%eax), %edx
        test    %edx, %edx
        jne     e30
        mov     BLK_REQ + 20(%eax), %edx
        cmp     %ecx, %edx
        jne     e33
        ret

/* check_sectors_0_1: the disk's signatures, then cleared for the next read. */
check_sectors_0_1:
        mov     BLK_DATA, %edx
        cmp     $0x4254554f, %edx               /* "OUTB" */
        jne     e31
        mov     BLK_DATA + 4, %edx
        cmp     $0x4452414f, %edx               /* "OARD" */
        jne     e31
        mov     BLK_DATA + 0x400, %edx
        cmp     $0x54434553, %edx               /* "SECT" */
        jne     e32
        mov     BLK_DATA + 0x404, %edx
        cmp     $0x312d524f, %edx               /* "OR-1" */
        jne     e32
        movl    $0, BLK_DATA
        movl    $0, BLK_DATA + 0x400
        ret

/* fill_pattern: segment k's write buffer (WBUF + (5k mod 126) KiB) holds
 * sector SECTOR0 + k: dword i = (sector << 16) | i. */
fill_pattern:
        pusha
        xor     %ecx, %ecx                      /* k */
        xor     %esi, %esi                      /* 5k mod 126 */
1:      mov     %esi, %edi
        shl     $10, %edi
        add     $WBUF, %edi
        lea     SECTOR0(%ecx), %eax
        shl     $16, %eax
        mov     $16, %edx
2:      .irp    off, 0, 4, 8, 12, 16, 20, 24, 28
        mov     %eax, \off(%edi)
        inc     %eax
        .endr
        add     $32, %edi
        dec     %edx
        jnz     2b
        add     $5, %esi
        cmp     $SEGS, %esi
        jb      3f
        sub     $SEGS, %esi
3:      inc     %ecx
        cmp     $SEGS, %ecx
        jb      1b
        popa
        ret

/* fill_canary: the whole read buffer area, gaps included. */
fill_canary:
        push    %edi
        mov     $RBUF, %edi
        mov     $SEGS * 256, %ecx
        mov     $CANARY, %eax
        cld
        rep stosl
        pop     %edi
        ret

/* check_read_back: segment k's read buffer (RBUF + (11k mod 126) KiB) holds
 * sector SECTOR0 + k, and the first and last dwords of the 512-byte gap
 * after it are still canary (the device wrote nothing past a segment, nor
 * before the next one). */
check_read_back:
        pusha
        xor     %ecx, %ecx                      /* k */
        xor     %esi, %esi                      /* 11k mod 126 */
1:      mov     %esi, %edi
        shl     $10, %edi
        add     $RBUF, %edi
        lea     SECTOR0(%ecx), %eax
        shl     $16, %eax
        mov     $16, %edx
2:      .irp    off, 0, 4, 8, 12, 16, 20, 24, 28
        mov     \off(%edi), %ebx
        cmp     %eax, %ebx
        jne     e34
        inc     %eax
        .endr
        add     $32, %edi
        dec     %edx
        jnz     2b
        mov     (%edi), %ebx
        cmp     $CANARY, %ebx
        jne     e35
        mov     508(%edi), %ebx
        cmp     $CANARY, %ebx
        jne     e35
        add     $11, %esi
        cmp     $SEGS, %esi
        jb      4f
        sub     $SEGS, %esi
4:      inc     %ecx
        cmp     $SEGS, %ecx
        jb      1b
        popa
        ret

/* submit_and_wait (rng, without event-idx): makes descriptor 0 available
 * on the queue at %edi of the device at %esi, notifies, and sleeps until
 * the used index catches up. */
submit_and_wait:
        movzwl  AVAIL_IDX(%edi), %eax
        mov     %eax, %ecx
        and     $QSIZE - 1, %ecx
        movw    $0, AVAIL_RING(%edi,%ecx,2)     /* avail.ring[idx % 8] = 0 */
        inc     %eax
        movw    %ax, AVAIL_IDX(%edi)            /* publish */
        cli
        movl    $0, QUEUE_NOTIFY(%esi)          /* an ioeventfd */
1:      movzwl  USED_IDX(%edi), %edx
        cmp     %ax, %dx
        je      2f
        sti                                     /* sti; hlt: no wake-up is lost */
        hlt
        cli
        jmp     1b
2:      ret

/* Interrupts are only taken in the `sti; hlt` of the waits, so the
 * handlers return by dropping the frame and jumping to the saved EIP with
 * interrupts off (see guests/interrupts.S: no IRET, which some nested
 * hypervisors cannot emulate in protected mode). */
isr_blk:
        push    %eax
        mov     VIRTIO_BLK + INT_STATUS, %eax
        mov     %eax, VIRTIO_BLK + INT_ACK
        or      %eax, BLK_RING + ST_IRQ_BITS
        incl    BLK_RING + ST_IRQS
        jmp     eoi
isr_rng:
        push    %eax
        mov     VIRTIO_RNG + INT_STATUS, %eax
        mov     %eax, VIRTIO_RNG + INT_ACK
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
e17:    EXIT    17
e30:    EXIT    30
e31:    EXIT    31
e32:    EXIT    32
e33:    EXIT    33
e34:    EXIT    34
e35:    EXIT    35
e36:    EXIT    36
e37:    EXIT    37
e38:    EXIT    38
e40:    EXIT    40
e41:    EXIT    41
        DEFINE_IDT
        DEFINE_PIC
        DEFINE_PUTS
        .equ    resume, DATA
msg:    .asciz  "virtio: indirect tables of up to 128 descriptors and event-idx on virtio-blk, 64 bytes from virtio-rng\n"
