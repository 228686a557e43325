/* pipeflood N: leave N children behind that keep the inherited stdout and stderr pipes
 * as full as they can (each pipe grown to the unprivileged maximum), then exit 0. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char buf[1 << 20];

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 4;
    memset(buf, 'z', sizeof buf);
    fcntl(1, F_SETPIPE_SZ, 1 << 20);
    fcntl(2, F_SETPIPE_SZ, 1 << 20);
    for (int i = 0; i < n; i++) {
        if (fork() == 0) {
            int fd = 1 + (i & 1);
            for (;;)
                if (write(fd, buf, sizeof buf) < 0)
                    _exit(0);
        }
    }
    usleep(argc > 2 ? atoi(argv[2]) * 1000 : 300000);
    return 0;
}
