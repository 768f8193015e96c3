/*
 * A light stand-in for OpenAI's Realtime endpoint: the upstream of the concurrency
 * ramp in bench/stranger.py (--light-echo).
 *
 * It does what bench/node/echo_upstream.mjs does in its default echo mode, in C on one
 * epoll loop, so that the load side of the ramp (load generator and upstream, which
 * share one core) stays unsaturated at the session counts the relay is judged at: at
 * 300 sessions the Node echo alone takes about 40% of that core.
 *
 * Per connection: an HTTP/1.1 upgrade (any path, query and credential; `realtime`
 * selected when offered, no extension), one `session.created` text frame, then every
 * data frame written back unmasked with its opcode and FIN bit as it came (text as
 * text, binary as binary, fragments as fragments), a ping answered with a pong, a close
 * answered with a close and the connection ended. Frames from the client must be
 * masked (RFC 6455 5.1); a protocol violation ends the connection.
 *
 * Bounds: a request head over HEAD_MAX_BYTES, a frame over FRAME_MAX_BYTES, or more
 * than OUTPUT_MAX_BYTES waiting to be written (a peer that does not read) end the
 * connection. Loopback only.
 *
 * Build: cc -O2 -o echo_upstream echo_upstream.c   Usage: echo_upstream --port PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "loop.h"

#define HEAD_MAX_BYTES 16384
#define FRAME_MAX_BYTES (32u * 1024u * 1024u)
#define OUTPUT_MAX_BYTES (64u * 1024u * 1024u)
#define READ_CHUNK_BYTES 65536
#define EVENTS_PER_WAIT 256

static const char SESSION_CREATED[] =
    "{\"type\":\"session.created\",\"event_id\":\"event_0\",\"session\":{\"id\":\"sess_x\","
    "\"object\":\"realtime.session\",\"type\":\"realtime\",\"model\":\"gpt-realtime\"}}";

struct conn {
    int fd;
    int upgraded;
    int closing; /* close frame sent: write what is left, then end */
    int watching_out; /* EPOLLOUT registered (only while output waits on a full socket) */
    struct buffer in, out;
};

/* ------------------------------------------------------------------ SHA-1, base64 */

static uint32_t rol(uint32_t v, int n) { return (v << n) | (v >> (32 - n)); }

static void sha1(const unsigned char *msg, size_t len, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    unsigned char *m = calloc(total, 1);
    if (!m) abort();
    memcpy(m, msg, len);
    m[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) m[total - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t chunk = 0; chunk < total; chunk += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)m[chunk + 4 * i] << 24 | (uint32_t)m[chunk + 4 * i + 1] << 16 |
                   (uint32_t)m[chunk + 4 * i + 2] << 8 | m[chunk + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            else f = b ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rol(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    free(m);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = (unsigned char)(h[i] >> (24 - 8 * j));
}

static void base64(const unsigned char *in, size_t n, char *out) {
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) |
                     (i + 2 < n ? in[i + 2] : 0);
        out[o++] = alphabet[v >> 18 & 63];
        out[o++] = alphabet[v >> 12 & 63];
        out[o++] = i + 1 < n ? alphabet[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? alphabet[v & 63] : '=';
    }
    out[o] = 0;
}

/* ------------------------------------------------------------------ frames */

static int write_frame(struct conn *c, int first, const unsigned char *payload, size_t n) {
    unsigned char header[10];
    size_t h = 0;
    header[h++] = (unsigned char)first;
    if (n < 126) {
        header[h++] = (unsigned char)n;
    } else if (n < 65536) {
        header[h++] = 126;
        header[h++] = (unsigned char)(n >> 8);
        header[h++] = (unsigned char)n;
    } else {
        header[h++] = 127;
        for (int i = 7; i >= 0; i--) header[h++] = (unsigned char)((uint64_t)n >> (8 * i));
    }
    if (c->out.len - c->out.pos + h + n > OUTPUT_MAX_BYTES) return -1;
    if (buffer_append(&c->out, header, h) || buffer_append(&c->out, payload, n)) return -1;
    return 0;
}

/* Handles every whole frame in the input; -1 ends the connection. */
static int handle_frames(struct conn *c) {
    struct buffer *in = &c->in;
    while (in->len - in->pos >= 2) {
        unsigned char *p = in->data + in->pos;
        size_t avail = in->len - in->pos;
        int first = p[0], opcode = p[0] & 0x0F;
        if (!(p[1] & 0x80) || (p[0] & 0x70)) return -1; /* unmasked, or RSV bits */
        uint64_t n = p[1] & 0x7F;
        size_t h = 2;
        if (n == 126) {
            if (avail < 4) return 0;
            n = (uint64_t)p[2] << 8 | p[3];
            h = 4;
        } else if (n == 127) {
            if (avail < 10) return 0;
            n = 0;
            for (int i = 0; i < 8; i++) n = n << 8 | p[2 + i];
            h = 10;
        }
        if (n > FRAME_MAX_BYTES) return -1;
        if (avail < h + 4 + n) return 0;
        unsigned char *key = p + h, *payload = p + h + 4;
        for (uint64_t i = 0; i < n; i++) payload[i] ^= key[i & 3];
        in->pos += h + 4 + n;
        if (opcode == 0x9) {
            if (write_frame(c, 0x8A, payload, n)) return -1;
        } else if (opcode == 0x8) {
            if (write_frame(c, 0x88, payload, n < 2 ? 0 : n)) return -1;
            c->closing = 1;
            return 0;
        } else if (opcode == 0xA) {
            /* a pong: nothing to do */
        } else if (opcode <= 0x2) {
            if (write_frame(c, first, payload, n)) return -1;
        } else {
            return -1;
        }
    }
    return 0;
}

static int handle_head(struct conn *c) {
    struct buffer *in = &c->in;
    unsigned char *end = memmem(in->data + in->pos, in->len - in->pos, "\r\n\r\n", 4);
    if (!end) return in->len - in->pos > HEAD_MAX_BYTES ? -1 : 0;
    size_t head_len = (size_t)(end - (in->data + in->pos)) + 4;
    char head[HEAD_MAX_BYTES + 8];
    if (head_len > HEAD_MAX_BYTES) return -1;
    memcpy(head, in->data + in->pos, head_len);
    head[head_len] = 0;
    in->pos += head_len;
    char key[128] = "";
    int realtime = 0;
    for (char *line = strstr(head, "\r\n"); line && line[2]; line = strstr(line + 2, "\r\n")) {
        char *name = line + 2, *colon = strchr(name, ':');
        char *eol = strstr(name, "\r\n");
        if (!colon || !eol || colon > eol) continue;
        char *value = colon + 1;
        while (*value == ' ') value++;
        size_t value_len = (size_t)(eol - value);
        if (!strncasecmp(name, "sec-websocket-key:", 18) && value_len < 64) {
            memcpy(key, value, value_len);
            key[value_len] = 0;
        } else if (!strncasecmp(name, "sec-websocket-protocol:", 23)) {
            char protocols[1024];
            size_t m = value_len < sizeof protocols - 1 ? value_len : sizeof protocols - 1;
            memcpy(protocols, value, m);
            protocols[m] = 0;
            for (char *t = strtok(protocols, ", "); t; t = strtok(NULL, ", "))
                if (!strcmp(t, "realtime")) realtime = 1;
        }
    }
    if (!key[0]) return -1;
    char joined[256];
    snprintf(joined, sizeof joined, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
    unsigned char digest[20];
    char accept[32];
    sha1((unsigned char *)joined, strlen(joined), digest);
    base64(digest, 20, accept);
    char answer[512];
    int n = snprintf(answer, sizeof answer,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n",
                     accept, realtime ? "Sec-WebSocket-Protocol: realtime\r\n" : "");
    if (buffer_append(&c->out, answer, (size_t)n)) return -1;
    if (write_frame(c, 0x81, (const unsigned char *)SESSION_CREATED, sizeof SESSION_CREATED - 1))
        return -1;
    c->upgraded = 1;
    return 0;
}

/* Writes what is pending; 1 when all of it went, 0 when the socket is full, -1 on error. */
static int flush(struct conn *c) {
    struct buffer *out = &c->out;
    while (out->pos < out->len) {
        ssize_t sent = send(c->fd, out->data + out->pos, out->len - out->pos, MSG_NOSIGNAL);
        if (sent < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        out->pos += (size_t)sent;
    }
    out->pos = out->len = 0;
    return 1;
}

static void end_conn(int epfd, struct conn *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in.data);
    free(c->out.data);
    free(c);
}

int main(int argc, char **argv) {
    int port = 0;
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "echo_upstream: --port PORT is required\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int listener = open_loopback_listener(port, "echo_upstream");
    if (listener < 0) return 1;
    int one = 1;
    int epfd = epoll_create1(0);
    struct epoll_event event = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &event);
    struct epoll_event events[EVENTS_PER_WAIT];
    unsigned char chunk[READ_CHUNK_BYTES];
    for (;;) {
        int ready = epoll_wait(epfd, events, EVENTS_PER_WAIT, -1);
        if (ready < 0 && errno != EINTR) return 1;
        for (int i = 0; i < ready; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *fresh = calloc(1, sizeof *fresh);
                    if (!fresh) {
                        close(fd);
                        continue;
                    }
                    fresh->fd = fd;
                    struct epoll_event add = {.events = EPOLLIN, .data.ptr = fresh};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &add);
                }
                continue;
            }
            int failed = 0;
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                for (;;) {
                    ssize_t got = recv(c->fd, chunk, sizeof chunk, 0);
                    if (got > 0) {
                        if (buffer_append(&c->in, chunk, (size_t)got)) failed = 1;
                        if ((size_t)got < sizeof chunk) break;
                    } else if (got == 0) {
                        failed = 1;
                        break;
                    } else {
                        if (errno != EAGAIN && errno != EWOULDBLOCK) failed = 1;
                        break;
                    }
                }
                if (!failed && !c->upgraded && handle_head(c)) failed = 1;
                if (!failed && c->upgraded && !c->closing && handle_frames(c)) failed = 1;
            }
            if (!failed) {
                int flushed = flush(c);
                if (flushed < 0 || (flushed == 1 && c->closing)) {
                    failed = 1;
                } else if (c->watching_out != !flushed) {
                    c->watching_out = !flushed;
                    struct epoll_event mod = {
                        .events = EPOLLIN | (flushed ? 0u : (uint32_t)EPOLLOUT), .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &mod);
                }
            }
            if (failed) end_conn(epfd, c);
        }
    }
}
