/* A hostile image's ELF loader, installed as /lib64/ld-linux-x86-64.so.2 in a
 * container whose busybox is static, so nothing of its own needs one.
 *
 * A dynamically linked binary exec'd inside the container runs this as its
 * interpreter. A `#!/proc/self/exe` script makes the kernel exec whatever the
 * spawning process's /proc/self/exe is (CVE-2019-5736): if that is a file of the
 * host, this code runs in a process whose executable is the host's file, and can hold
 * it open. It records what it got, one line appended to /tmp/exe-seen:
 *     DEV INO SEALS OPEN_FOR_WRITE_ERRNO LINK
 * (SEALS -1: not a memfd). An interpreter starts with the main program's auxiliary
 * vector, which a libc's start-up would misread: this one uses no libc (x86-64). */
#define O_RDONLY 0
#define O_WRONLY 1
#define O_APPEND 02000
#define O_CREAT 0100
#define F_GET_SEALS 1034

static long sys(long n, long a, long b, long c) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

struct kstat { unsigned long dev, ino, nlink; unsigned int mode, uid, gid, pad; unsigned long rdev;
               long size, blksize, blocks; unsigned long times[6]; long unused[3]; };

static char *num(char *p, long v) {
    char tmp[24];
    int n = 0;
    if (v < 0) { *p++ = '-'; v = -v; }
    do { tmp[n++] = '0' + v % 10; v /= 10; } while (v);
    while (n) *p++ = tmp[--n];
    return p;
}

void _start(void) {
    static char line[4400], link[4096];
    struct kstat st;
    long fd = sys(2, (long)"/proc/self/exe", O_RDONLY, 0);           /* open */
    long code = 3;
    if (fd >= 0 && sys(5, fd, (long)&st, 0) == 0) {                     /* fstat */
        long seals = sys(72, fd, F_GET_SEALS, 0);                        /* fcntl */
        long w = sys(2, (long)"/proc/self/exe", O_WRONLY, 0);
        long n = sys(89, (long)"/proc/self/exe", (long)link, sizeof link - 1);  /* readlink */
        char *p = line;
        p = num(p, st.dev); *p++ = ' ';
        p = num(p, st.ino); *p++ = ' ';
        p = num(p, seals < 0 ? -1 : seals); *p++ = ' ';
        p = num(p, w < 0 ? -w : 0); *p++ = ' ';
        for (long i = 0; i < n; i++) *p++ = link[i];
        *p++ = '\n';
        long out = sys(2, (long)"/tmp/exe-seen", O_WRONLY | O_APPEND | O_CREAT, 0666);
        if (out >= 0 && sys(1, out, (long)line, p - line) == p - line)  /* write */
            code = 0;
    }
    sys(60, code, 0, 0);                                                 /* exit */
    for (;;) {}
}
