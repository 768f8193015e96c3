/* What the bench's C upstreams (echo_upstream.c, sse_upstream.c) share: a growable byte
 * buffer and a non-blocking listener on the loopback address. Header-only: each program
 * is still one `cc file.c` (bench/harness.py's build_c_program). */
#ifndef BENCH_C_LOOP_H
#define BENCH_C_LOOP_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define LISTEN_BACKLOG 4096

struct buffer {
    unsigned char *data;
    size_t len, cap, pos; /* pos: consumed (input) or written (output) */
};

static int buffer_reserve(struct buffer *b, size_t more) {
    if (b->pos && b->pos == b->len) b->pos = b->len = 0;
    if (b->len + more <= b->cap) return 0;
    if (b->pos) { /* compact first */
        memmove(b->data, b->data + b->pos, b->len - b->pos);
        b->len -= b->pos;
        b->pos = 0;
        if (b->len + more <= b->cap) return 0;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) cap *= 2;
    unsigned char *data = realloc(b->data, cap);
    if (!data) return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

static int buffer_append(struct buffer *b, const void *src, size_t n) {
    if (buffer_reserve(b, n)) return -1;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

/* A non-blocking listener on 127.0.0.1:port, or -1 (with the reason on stderr, after
 * `program`). */
static int open_loopback_listener(int port, const char *program) {
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) ||
        listen(listener, LISTEN_BACKLOG)) {
        fprintf(stderr, "%s: listen: ", program);
        perror(NULL);
        if (listener >= 0) close(listener);
        return -1;
    }
    return listener;
}

#endif
