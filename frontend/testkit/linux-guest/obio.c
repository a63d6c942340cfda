/*
 * obio: the Linux guest's block I/O helper (built with gcc -static by
 * outboard_testkit::linux, put in the initramfs as /bin/obio).
 *
 * It does what busybox cannot: O_DIRECT requests with a chosen number of
 * segments, a deterministic data pattern the host recomputes
 * (outboard_testkit::linux::pattern), BLKZEROOUT, and Linux AIO at queue
 * depth > 1 (raw io_submit, no libaio).
 *
 * The pattern: the 8-byte little-endian word at byte offset o (a multiple of
 * 8) of the device is splitmix64(seed + (o / 8) * 0x9E3779B97F4A7C15).
 *
 *   obio pattern SEED OFF LEN                  the pattern bytes to stdout
 *   obio write DEV SEED OFF LEN BS SEGS MODE   MODE: direct or buffered (then fsync)
 *   obio verify DEV SEED OFF LEN BS MODE       read back and compare
 *   obio zeros DEV OFF LEN BS                  O_DIRECT read, every byte zero
 *   obio zeroout DEV OFF LEN                   ioctl BLKZEROOUT
 *   obio discard DEV OFF LEN                   ioctl BLKDISCARD
 *   obio aio DEV read|write SEED OFF LEN BS QD PASSES
 *                                              O_DIRECT AIO over [OFF, OFF+LEN), QD in flight;
 *                                              writes the pattern, reads verify it;
 *                                              prints "ops=N ns=T maxqd=Q"
 *   obio now                                   CLOCK_MONOTONIC in ns
 *
 * A direct write of BS bytes in SEGS segments puts segment i at the start of
 * page 2*i of a fresh mapping (SEGS > 1 and BS/SEGS <= 4096) whose pages are
 * all faulted in, in order, first: the page between two segments takes the
 * physical frame between theirs (with a page allocator that hands out
 * ascending or descending frames), so the block layer cannot merge
 * neighbours and the request reaches the device with SEGS data descriptors.
 *
 * Exit status: 0 success, 1 data mismatch, 2 usage, 3 system call error
 * (the message names the errno, e.g. EROFS).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX_SEGS 1024

static const char *errno_name(int e)
{
    switch (e) {
    case EROFS: return "EROFS";
    case EIO: return "EIO";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case EINVAL: return "EINVAL";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ENOSPC: return "ENOSPC";
    case ENOMEM: return "ENOMEM";
    case EAGAIN: return "EAGAIN";
    case ENXIO: return "ENXIO";
    case ENODEV: return "ENODEV";
    case ENOENT: return "ENOENT";
    default: return "E?";
    }
}

static int fail(const char *what)
{
    int e = errno;
    printf("obio: %s: %s (%s)\n", what, strerror(e), errno_name(e));
    fflush(stdout);
    return 3;
}

static uint64_t num(const char *s)
{
    return strtoull(s, NULL, 0);
}

static uint64_t pattern_word(uint64_t seed, uint64_t off)
{
    uint64_t z = seed + (off >> 3) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Fills len bytes (a multiple of 8, off 8-aligned) with the pattern at off. */
static void fill(unsigned char *buf, uint64_t seed, uint64_t off, size_t len)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t w = pattern_word(seed, off + i);
        for (int b = 0; b < 8; b++)
            buf[i + b] = (unsigned char)(w >> (8 * b));
    }
}

/* Index of the first byte that differs from the pattern, or -1. */
static long long check(const unsigned char *buf, uint64_t seed, uint64_t off, size_t len)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t w = pattern_word(seed, off + i);
        for (int b = 0; b < 8; b++)
            if (buf[i + b] != (unsigned char)(w >> (8 * b)))
                return (long long)(i + b);
    }
    return -1;
}

static void *fresh(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    madvise(p, len, MADV_NOHUGEPAGE);
    return p;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int open_dev(const char *dev, int flags, int direct)
{
    return open(dev, flags | (direct ? O_DIRECT : 0) | O_CLOEXEC);
}

static int cmd_pattern(uint64_t seed, uint64_t off, uint64_t len)
{
    static unsigned char buf[1 << 16];
    while (len > 0) {
        size_t n = len < sizeof(buf) ? (size_t)len : sizeof(buf);
        fill(buf, seed, off, n);
        if (fwrite(buf, 1, n, stdout) != n)
            return fail("write stdout");
        off += n;
        len -= n;
    }
    return fflush(stdout) == 0 ? 0 : fail("flush stdout");
}

static int cmd_write(const char *dev, uint64_t seed, uint64_t off, uint64_t len, size_t bs,
                     size_t segs, int direct)
{
    if (bs == 0 || bs % 512 || len % bs || segs == 0 || segs > MAX_SEGS || bs % segs
        || (bs / segs) % 512)
        return 2;
    int fd = open_dev(dev, O_WRONLY, direct);
    if (fd < 0)
        return fail("open");
    size_t seg = bs / segs;
    int spread = segs > 1 && seg <= PAGE;
    size_t map_len = spread ? segs * 2 * PAGE : bs;
    struct iovec iov[MAX_SEGS];
    for (uint64_t done = 0; done < len; done += bs) {
        unsigned char *m = fresh(map_len);
        if (!m)
            return fail("mmap");
        /* Fault every page in, in order, so that the pages between the
         * segments get frames between the segments' frames. */
        memset(m, 0x5a, map_len);
        for (size_t i = 0; i < segs; i++) {
            iov[i].iov_base = spread ? m + i * 2 * PAGE : m + i * seg;
            iov[i].iov_len = seg;
            fill(iov[i].iov_base, seed, off + done + i * seg, seg);
        }
        ssize_t n = pwritev(fd, iov, (int)segs, (off_t)(off + done));
        if (n < 0)
            return fail("pwritev");
        if ((size_t)n != bs) {
            printf("obio: short write %zd of %zu at %llu\n", n, bs,
                   (unsigned long long)(off + done));
            return 3;
        }
        munmap(m, map_len);
    }
    if (!direct && fsync(fd) < 0)
        return fail("fsync");
    close(fd);
    return 0;
}

static int cmd_verify(const char *dev, uint64_t seed, uint64_t off, uint64_t len, size_t bs,
                      int direct, int zeros)
{
    if (bs == 0 || bs % 512 || len % bs)
        return 2;
    int fd = open_dev(dev, O_RDONLY, direct);
    if (fd < 0)
        return fail("open");
    unsigned char *m = fresh(bs);
    if (!m)
        return fail("mmap");
    for (uint64_t done = 0; done < len; done += bs) {
        ssize_t n = pread(fd, m, bs, (off_t)(off + done));
        if (n < 0)
            return fail("pread");
        if ((size_t)n != bs) {
            printf("obio: short read %zd of %zu at %llu\n", n, bs,
                   (unsigned long long)(off + done));
            return 3;
        }
        long long bad = -1;
        if (zeros) {
            for (size_t i = 0; i < bs; i++)
                if (m[i]) {
                    bad = (long long)i;
                    break;
                }
        } else {
            bad = check(m, seed, off + done, bs);
        }
        if (bad >= 0) {
            printf("obio: mismatch at byte %llu (got 0x%02x)\n",
                   (unsigned long long)(off + done + (uint64_t)bad), m[bad]);
            return 1;
        }
    }
    close(fd);
    return 0;
}

static int cmd_ioctl(const char *dev, unsigned long req, uint64_t off, uint64_t len)
{
    int fd = open(dev, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return fail("open");
    uint64_t range[2] = { off, len };
    if (ioctl(fd, req, range) < 0)
        return fail(req == BLKZEROOUT ? "BLKZEROOUT" : "BLKDISCARD");
    close(fd);
    return 0;
}

static long sys_io_setup(unsigned n, aio_context_t *ctx) { return syscall(SYS_io_setup, n, ctx); }
static long sys_io_submit(aio_context_t ctx, long n, struct iocb **cbs)
{
    return syscall(SYS_io_submit, ctx, n, cbs);
}
static long sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *ev)
{
    return syscall(SYS_io_getevents, ctx, min, max, ev, NULL);
}

static int cmd_aio(const char *dev, int write, uint64_t seed, uint64_t off, uint64_t len,
                   size_t bs, unsigned qd, unsigned passes)
{
    if (bs == 0 || bs % 512 || len % bs || qd == 0 || qd > 256 || len / bs < qd)
        return 2;
    int fd = open_dev(dev, write ? O_WRONLY : O_RDONLY, 1);
    if (fd < 0)
        return fail("open");
    aio_context_t ctx = 0;
    if (sys_io_setup(qd, &ctx) < 0)
        return fail("io_setup");
    struct iocb cb[256];
    struct iocb *ptr[256];
    struct io_event ev[256];
    unsigned char *buf = fresh(bs * qd);
    if (!buf)
        return fail("mmap");
    uint64_t blocks = len / bs, total = blocks * passes, issued = 0, done = 0;
    unsigned inflight = 0, maxqd = 0;
    unsigned free_slots[256], nfree = qd;
    for (unsigned i = 0; i < qd; i++)
        free_slots[i] = i;
    uint64_t t0 = now_ns();
    while (done < total) {
        long n = 0;
        while (nfree > 0 && issued < total) {
            unsigned s = free_slots[--nfree];
            uint64_t at = off + (issued % blocks) * bs;
            memset(&cb[s], 0, sizeof(cb[s]));
            cb[s].aio_fildes = (uint32_t)fd;
            cb[s].aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
            cb[s].aio_buf = (uint64_t)(uintptr_t)(buf + s * bs);
            cb[s].aio_nbytes = bs;
            cb[s].aio_offset = (int64_t)at;
            cb[s].aio_data = s;
            if (write)
                fill(buf + s * bs, seed, at, bs);
            ptr[n++] = &cb[s];
            issued++;
        }
        if (n > 0) {
            long got = sys_io_submit(ctx, n, ptr);
            if (got != n)
                return fail("io_submit");
            inflight += (unsigned)n;
            if (inflight > maxqd)
                maxqd = inflight;
        }
        long r = sys_io_getevents(ctx, 1, qd, ev);
        if (r < 0)
            return fail("io_getevents");
        for (long i = 0; i < r; i++) {
            unsigned s = (unsigned)ev[i].data;
            if (ev[i].res != (int64_t)bs) {
                errno = ev[i].res < 0 ? (int)-ev[i].res : EIO;
                return fail(write ? "aio write" : "aio read");
            }
            if (!write && seed != 0) {
                long long bad = check(buf + s * bs, seed, (uint64_t)cb[s].aio_offset, bs);
                if (bad >= 0) {
                    printf("obio: mismatch at byte %llu\n",
                           (unsigned long long)cb[s].aio_offset + (unsigned long long)bad);
                    return 1;
                }
            }
            free_slots[nfree++] = s;
            inflight--;
            done++;
        }
    }
    uint64_t t1 = now_ns();
    printf("ops=%llu ns=%llu maxqd=%u\n", (unsigned long long)done,
           (unsigned long long)(t1 - t0), maxqd);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    const char *c = argc > 1 ? argv[1] : "";
    if (!strcmp(c, "pattern") && argc == 5)
        return cmd_pattern(num(argv[2]), num(argv[3]), num(argv[4]));
    if (!strcmp(c, "write") && argc == 9)
        return cmd_write(argv[2], num(argv[3]), num(argv[4]), num(argv[5]), num(argv[6]),
                         num(argv[7]), !strcmp(argv[8], "direct"));
    if (!strcmp(c, "verify") && argc == 8)
        return cmd_verify(argv[2], num(argv[3]), num(argv[4]), num(argv[5]), num(argv[6]),
                          !strcmp(argv[7], "direct"), 0);
    if (!strcmp(c, "zeros") && argc == 6)
        return cmd_verify(argv[2], 0, num(argv[3]), num(argv[4]), num(argv[5]), 1, 1);
    if (!strcmp(c, "zeroout") && argc == 5)
        return cmd_ioctl(argv[2], BLKZEROOUT, num(argv[3]), num(argv[4]));
    if (!strcmp(c, "discard") && argc == 5)
        return cmd_ioctl(argv[2], BLKDISCARD, num(argv[3]), num(argv[4]));
    if (!strcmp(c, "aio") && argc == 10)
        return cmd_aio(argv[2], !strcmp(argv[3], "write"), num(argv[4]), num(argv[5]),
                       num(argv[6]), num(argv[7]), (unsigned)num(argv[8]), (unsigned)num(argv[9]));
    if (!strcmp(c, "now") && argc == 2) {
        printf("%llu\n", (unsigned long long)now_ns());
        return 0;
    }
    fprintf(stderr, "usage: see the comment at the top of obio.c\n");
    return 2;
}
