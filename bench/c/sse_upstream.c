/*
 * A light stand-in for OpenAI's streamed chat completions: the upstream of bench/rest.py.
 *
 * It answers what the simulator (relay simulate, relay/simulator/rest.py and
 * rest_payloads.py) answers to `POST /v1/chat/completions` with `"stream": true`, in the
 * same bytes and at the same pace, in C on one epoll loop, so that the load side of the
 * REST bench (load client and upstream, which share one core when pinned) is not
 * saturated by the upstream: the Python simulator costs about 125 us of that core per
 * streamed chunk.
 *
 * The answer: a `200` head (`Content-Type: text/event-stream; charset=utf-8`,
 * `x-request-id`, `Cache-Control: no-cache`, `Transfer-Encoding: chunked`), then one HTTP
 * chunk per Server-Sent Event: the role chunk at once, then each `--chunk-interval-ms`
 * after the one before it, STREAM_CHUNKS text deltas (`Simulated answer to <n>
 * characters.`, ` Piece 2.`, ...), the `finish_reason: "stop"` chunk, the usage chunk
 * when the request asked with `stream_options.include_usage` (every chunk then carries
 * `"usage": null` until it), and `data: [DONE]`, followed at once by the last chunk. Each
 * chunk is its own send, as the simulator's (h11 over Trio) are. `<n>` is the prompt's
 * characters: the string `content` values of the request (code points, an escape
 * counted as one), which is the simulator's count for the string contents the bench
 * sends; the usage is the simulator's (`ceil(n / 4)` prompt tokens, one per delta).
 *
 * HTTP/1.1 keep-alive, requests one at a time (a pipelined request waits for the answer
 * before it); a `Content-Length` body (chunked uploads get 411); `Authorization: Bearer
 * <--api-key>` when a key is given (401 otherwise); any other path or method 404, a
 * request without `"stream": true` 400, each in OpenAI's error envelope. A client that
 * closes its connection ends its stream at once.
 *
 * Bounds: a request head over HEAD_MAX_BYTES or a body over BODY_MAX_BYTES ends the
 * connection (413 for the body), as does more than OUTPUT_MAX_BYTES waiting to be
 * written (a peer that does not read). Loopback only.
 *
 * Build: cc -O2 -o sse_upstream sse_upstream.c
 * Usage: sse_upstream --port PORT [--chunk-interval-ms 20] [--chunk-jitter-ms 0]
 *                     [--stream-chunks 20] [--api-key KEY]
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
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "loop.h"

#define HEAD_MAX_BYTES 16384
#define BODY_MAX_BYTES (1024u * 1024u)
#define OUTPUT_MAX_BYTES (16u * 1024u * 1024u)
#define READ_CHUNK_BYTES 65536
#define EVENTS_PER_WAIT 256
#define MODEL_MAX_BYTES 256
#define KEY_MAX_BYTES 512
#define EVENT_MAX_BYTES 4096
#define ID_BODY_CHARS 21
#define CHARS_PER_TOKEN 4
#define DEFAULT_CHUNK_INTERVAL_MS 20
#define DEFAULT_STREAM_CHUNKS 20
#define MAX_STREAM_CHUNKS 100000

static const char CHAT_PATH[] = "/v1/chat/completions";

struct conn {
    int fd;
    int watching_out; /* EPOLLOUT registered (only while output waits on a full socket) */
    int close_after;  /* end the connection once the current answer is written */
    int streaming;    /* an answer's events are still to come */
    int dead;         /* ended: freed after the current batch of events */
    struct conn *next_dead;
    struct buffer in, out;
    /* the stream */
    int next_event; /* index of the next SSE event to send */
    int include_usage;
    int prompt_chars;
    long created;
    char id[ID_BODY_CHARS + 1];
    char model[MODEL_MAX_BYTES + 1];
    /* the pacing queue, ordered by due time (without jitter every wait is the same
       interval and a new entry goes at the tail) */
    struct conn *prev, *next;
    int queued;
    uint64_t due_ns;
};

static int chunk_interval_ms = DEFAULT_CHUNK_INTERVAL_MS;
/* Each wait between events is the interval plus a uniform draw in [-jitter, +jitter]:
   real token streams are irregular, and a fixed interval keeps streams that once started
   together in lockstep for ever (their events arrive at a proxy in bursts). */
static int chunk_jitter_ms = 0;
static int stream_chunks = DEFAULT_STREAM_CHUNKS;
static char api_key[KEY_MAX_BYTES + 1];
static struct conn *queue_head, *queue_tail, *graveyard;
static uint64_t armed_due; /* what the timer is set to (0: disarmed) */
static uint64_t rng_state;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static uint64_t next_random(void) { /* xorshift64*: ids only, not secrets */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static void new_id(char *out) {
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    for (int i = 0; i < ID_BODY_CHARS; i++) out[i] = alphabet[next_random() % 62];
    out[ID_BODY_CHARS] = 0;
}

/* ------------------------------------------------------------------ the pacing queue */

static void enqueue(struct conn *c, uint64_t due_ns) {
    c->due_ns = due_ns;
    /* after the last entry due no later (the tail at once, without jitter) */
    struct conn *after = queue_tail;
    while (after && after->due_ns > due_ns) after = after->prev;
    c->prev = after;
    c->next = after ? after->next : queue_head;
    if (c->next) c->next->prev = c;
    else queue_tail = c;
    if (after) after->next = c;
    else queue_head = c;
    c->queued = 1;
}

/* The wait before a stream's next event, in nanoseconds. */
static uint64_t next_wait_ns(void) {
    int64_t wait_us = (int64_t)chunk_interval_ms * 1000;
    if (chunk_jitter_ms > 0) {
        int64_t span_us = (int64_t)chunk_jitter_ms * 1000;
        wait_us += (int64_t)(next_random() % (uint64_t)(2 * span_us + 1)) - span_us;
    }
    return (uint64_t)wait_us * 1000u;
}

static void dequeue(struct conn *c) {
    if (!c->queued) return;
    if (c->prev) c->prev->next = c->next;
    else queue_head = c->next;
    if (c->next) c->next->prev = c->prev;
    else queue_tail = c->prev;
    c->prev = c->next = NULL;
    c->queued = 0;
}

static void arm(int timer_fd) {
    struct itimerspec spec = {0};
    uint64_t due = queue_head ? (queue_head->due_ns ? queue_head->due_ns : 1) : 0;
    if (due == armed_due) return;
    armed_due = due;
    if (due) {
        spec.it_value.tv_sec = (time_t)(due / 1000000000u);
        spec.it_value.tv_nsec = (long)(due % 1000000000u);
    }
    timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &spec, NULL);
}

/* ------------------------------------------------------------------ writing */

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

/* One send of `n` bytes (kept for later when the socket is full); -1 ends the connection. */
static int send_piece(int epfd, struct conn *c, const void *data, size_t n) {
    if (c->out.len - c->out.pos + n > OUTPUT_MAX_BYTES) return -1;
    if (buffer_append(&c->out, data, n)) return -1;
    if (c->watching_out) return 0; /* EPOLLOUT writes it after what waits already */
    int flushed = flush(c);
    if (flushed < 0) return -1;
    if (!flushed) {
        struct epoll_event modify = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &modify);
        c->watching_out = 1;
    }
    return 0;
}

/* One HTTP chunk holding `payload`, in one send. */
static int send_chunk(int epfd, struct conn *c, const char *payload, size_t n) {
    char framed[EVENT_MAX_BYTES + 32];
    int h = snprintf(framed, sizeof framed, "%zx\r\n", n);
    if (n + (size_t)h + 2 > sizeof framed) return -1;
    memcpy(framed + h, payload, n);
    memcpy(framed + h + n, "\r\n", 2);
    return send_piece(epfd, c, framed, (size_t)h + n + 2);
}

static int send_error(int epfd, struct conn *c, int status, const char *reason,
                      const char *message, const char *code) {
    char body[1024], answer[2048];
    int b = snprintf(body, sizeof body,
                     "{\"error\":{\"message\":\"%s\",\"type\":\"invalid_request_error\","
                     "\"param\":null,\"code\":\"%s\"}}",
                     message, code);
    char request_id[ID_BODY_CHARS + 1];
    new_id(request_id);
    int n = snprintf(answer, sizeof answer,
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                     "x-request-id: req_%s\r\nContent-Length: %d\r\n%s\r\n%s",
                     status, reason, request_id, b, c->close_after ? "Connection: close\r\n" : "",
                     body);
    return send_piece(epfd, c, answer, (size_t)n);
}

/* ------------------------------------------------------------------ the stream */

static int total_events(const struct conn *c) {
    /* role, the deltas, finish, (usage), [DONE] */
    return stream_chunks + 3 + (c->include_usage ? 1 : 0);
}

static int format_event(const struct conn *c, int index, char *out, size_t cap) {
    int last = total_events(c) - 1;
    if (index == last) return snprintf(out, cap, "data: [DONE]\n\n");
    char choices[512];
    const char *usage_tail = c->include_usage ? ",\"usage\":null" : "";
    char usage_object[512];
    if (index == 0) {
        snprintf(choices, sizeof choices,
                 "[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\","
                 "\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}]");
    } else if (index <= stream_chunks) {
        char piece[128];
        if (index == 1)
            snprintf(piece, sizeof piece, "Simulated answer to %d characters.", c->prompt_chars);
        else
            snprintf(piece, sizeof piece, " Piece %d.", index);
        snprintf(choices, sizeof choices,
                 "[{\"index\":0,\"delta\":{\"content\":\"%s\"},\"logprobs\":null,"
                 "\"finish_reason\":null}]",
                 piece);
    } else if (index == stream_chunks + 1) {
        snprintf(choices, sizeof choices,
                 "[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]");
    } else {
        int prompt_tokens = (c->prompt_chars + CHARS_PER_TOKEN - 1) / CHARS_PER_TOKEN;
        snprintf(choices, sizeof choices, "[]");
        snprintf(usage_object, sizeof usage_object,
                 ",\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,"
                 "\"total_tokens\":%d,\"prompt_tokens_details\":{\"cached_tokens\":0,"
                 "\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,"
                 "\"audio_tokens\":0,\"accepted_prediction_tokens\":0,"
                 "\"rejected_prediction_tokens\":0}}",
                 prompt_tokens, stream_chunks, prompt_tokens + stream_chunks);
        usage_tail = usage_object;
    }
    return snprintf(out, cap,
                    "data: {\"id\":\"chatcmpl-%s\",\"object\":\"chat.completion.chunk\","
                    "\"created\":%ld,\"model\":\"%s\",\"service_tier\":\"default\","
                    "\"system_fingerprint\":\"fp_simulator\",\"choices\":%s%s}\n\n",
                    c->id, c->created, c->model, choices, usage_tail);
}

static int handle_requests(int epfd, struct conn *c);

/* The stream's next event (and, after [DONE], the last chunk); -1 ends the connection. */
static int send_next_event(int epfd, struct conn *c) {
    char event[EVENT_MAX_BYTES];
    int n = format_event(c, c->next_event, event, sizeof event);
    if (n < 0 || (size_t)n >= sizeof event) return -1;
    if (send_chunk(epfd, c, event, (size_t)n)) return -1;
    c->next_event++;
    if (c->next_event < total_events(c)) return 0;
    if (send_piece(epfd, c, "0\r\n\r\n", 5)) return -1;
    c->streaming = 0;
    return 0;
}

/* Sends what is due now and queues the rest; -1 ends the connection. */
static int advance(int epfd, struct conn *c) {
    if (send_next_event(epfd, c)) return -1;
    while (c->streaming && chunk_interval_ms == 0)
        if (send_next_event(epfd, c)) return -1;
    if (c->streaming) {
        enqueue(c, now_ns() + next_wait_ns());
        return 0;
    }
    if (c->close_after) return c->out.pos < c->out.len ? 0 : -1;
    return handle_requests(epfd, c); /* a request sent while this one streamed */
}

/* ------------------------------------------------------------------ the request */

static const char *skip_space(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) p++;
    return p;
}

/* Where the value of the JSON key `key` (quoted, e.g. "\"model\"") starts, or NULL. */
static const char *json_value(const char *body, const char *end, const char *key,
                              const char *from) {
    size_t key_len = strlen(key);
    for (const char *p = from ? from : body; p && p < end;) {
        const char *found = memmem(p, (size_t)(end - p), key, key_len);
        if (!found) return NULL;
        const char *after = skip_space(found + key_len, end);
        if (after < end && *after == ':') return skip_space(after + 1, end);
        p = found + key_len;
    }
    return NULL;
}

/* The code points of the JSON string at `p` (its opening quote), an escape counted as one;
   `*stop` is set past its closing quote. -1 when it is not a string. */
static int json_string_chars(const char *p, const char *end, const char **stop) {
    if (p >= end || *p != '"') return -1;
    int count = 0;
    for (p++; p < end; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"') {
            *stop = p + 1;
            return count;
        }
        if (ch == '\\') {
            p++;
            if (p < end && *p == 'u') p += 4;
            count++;
        } else if ((ch & 0xC0) != 0x80) {
            count++;
        }
    }
    return -1;
}

static int prompt_chars_of(const char *body, const char *end) {
    const char *messages = json_value(body, end, "\"messages\"", NULL);
    if (!messages) return 0;
    int total = 0;
    for (const char *p = messages; (p = json_value(body, end, "\"content\"", p));) {
        const char *stop = p + 1;
        int chars = json_string_chars(p, end, &stop);
        if (chars > 0) total += chars;
        p = stop;
    }
    return total;
}

static int is_true(const char *value, const char *end) {
    return value && end - value >= 4 && !memcmp(value, "true", 4);
}

static int start_stream(int epfd, struct conn *c, const char *body, size_t body_len) {
    const char *end = body + body_len;
    const char *model = json_value(body, end, "\"model\"", NULL);
    const char *stop = NULL;
    if (!model || json_string_chars(model, end, &stop) < 0 ||
        (size_t)(stop - model - 2) > MODEL_MAX_BYTES)
        return send_error(epfd, c, 400, "Bad Request", "you must provide a model parameter",
                          "missing_model");
    if (!is_true(json_value(body, end, "\"stream\"", NULL), end))
        return send_error(epfd, c, 400, "Bad Request",
                          "this upstream answers streamed chat completions only", "stream_only");
    memcpy(c->model, model + 1, (size_t)(stop - model - 2));
    c->model[stop - model - 2] = 0;
    c->include_usage = is_true(json_value(body, end, "\"include_usage\"", NULL), end);
    c->prompt_chars = prompt_chars_of(body, end);
    c->created = (long)time(NULL);
    new_id(c->id);
    char request_id[ID_BODY_CHARS + 1], head[512];
    new_id(request_id);
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 200 \r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                     "x-request-id: req_%s\r\nCache-Control: no-cache\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n",
                     request_id);
    if (send_piece(epfd, c, head, (size_t)n)) return -1;
    c->streaming = 1;
    c->next_event = 0;
    return advance(epfd, c);
}

static int header_is(const char *name, size_t name_len, const char *wanted) {
    return name_len == strlen(wanted) && !strncasecmp(name, wanted, name_len);
}

/* Answers every whole request in the input, one at a time; -1 ends the connection. */
static int handle_requests(int epfd, struct conn *c) {
    struct buffer *in = &c->in;
    while (!c->streaming && !c->close_after && in->len > in->pos) {
        char *start = (char *)in->data + in->pos;
        size_t avail = in->len - in->pos;
        char *head_end = memmem(start, avail, "\r\n\r\n", 4);
        if (!head_end) return avail > HEAD_MAX_BYTES ? -1 : 0;
        size_t head_len = (size_t)(head_end - start) + 4;
        if (head_len > HEAD_MAX_BYTES) return -1;
        char *line_end = memmem(start, head_len, "\r\n", 2);
        char *space = memchr(start, ' ', (size_t)(line_end - start));
        if (!space) return -1;
        char *target = space + 1;
        char *target_end = memchr(target, ' ', (size_t)(line_end - target));
        if (!target_end) return -1;
        char *query = memchr(target, '?', (size_t)(target_end - target));
        size_t path_len = (size_t)((query ? query : target_end) - target);
        int post = space - start == 4 && !memcmp(start, "POST", 4);
        int chat = path_len == sizeof CHAT_PATH - 1 && !memcmp(target, CHAT_PATH, path_len);
        long long length = 0;
        int chunked = 0, close_requested = 0, authorized = api_key[0] == 0;
        for (char *line = line_end + 2; line < head_end;) {
            char *eol = memmem(line, (size_t)(head_end + 2 - line), "\r\n", 2);
            char *colon = memchr(line, ':', (size_t)(eol - line));
            if (colon) {
                size_t name_len = (size_t)(colon - line);
                const char *value = skip_space(colon + 1, eol);
                size_t value_len = (size_t)(eol - value);
                if (header_is(line, name_len, "content-length")) {
                    length = strtoll(value, NULL, 10);
                } else if (header_is(line, name_len, "transfer-encoding")) {
                    chunked = 1;
                } else if (header_is(line, name_len, "connection")) {
                    if (value_len >= 5 && !strncasecmp(value, "close", 5)) close_requested = 1;
                } else if (header_is(line, name_len, "authorization") && api_key[0]) {
                    authorized = value_len == 7 + strlen(api_key) &&
                                 !strncasecmp(value, "Bearer ", 7) &&
                                 !memcmp(value + 7, api_key, value_len - 7);
                }
            }
            line = eol + 2;
        }
        if (chunked) {
            c->close_after = 1;
            if (send_error(epfd, c, 411, "Length Required", "send a Content-Length",
                           "length_required"))
                return -1;
            break;
        }
        if (length < 0 || length > (long long)BODY_MAX_BYTES) {
            c->close_after = 1;
            if (send_error(epfd, c, 413, "Payload Too Large", "request body too large",
                           "body_too_large"))
                return -1;
            break;
        }
        if (avail < head_len + (size_t)length) return 0; /* the body is still coming */
        c->close_after = close_requested;
        char *body = start + head_len;
        in->pos += head_len + (size_t)length;
        int failed;
        if (!post || !chat)
            failed = send_error(epfd, c, 404, "Not Found", "no such endpoint here", "not_found");
        else if (!authorized)
            failed = send_error(epfd, c, 401, "Unauthorized", "incorrect API key provided",
                                "invalid_api_key");
        else
            failed = start_stream(epfd, c, body, (size_t)length);
        if (failed) return -1;
    }
    if (c->close_after && !c->streaming && c->out.pos >= c->out.len) return -1;
    return 0;
}

/* Closes the connection; its memory goes after the batch (an event for it may follow). */
static void end_conn(int epfd, struct conn *c) {
    if (c->dead) return;
    dequeue(c);
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->dead = 1;
    c->next_dead = graveyard;
    graveyard = c;
}

static void bury(void) {
    while (graveyard) {
        struct conn *c = graveyard;
        graveyard = c->next_dead;
        free(c->in.data);
        free(c->out.data);
        free(c);
    }
}

int main(int argc, char **argv) {
    int port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--chunk-interval-ms")) chunk_interval_ms = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--chunk-jitter-ms")) chunk_jitter_ms = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--stream-chunks")) stream_chunks = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--api-key")) snprintf(api_key, sizeof api_key, "%s", argv[i + 1]);
        else {
            fprintf(stderr, "sse_upstream: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (port <= 0 || port > 65535 || chunk_interval_ms < 0 || stream_chunks < 1 ||
        stream_chunks > MAX_STREAM_CHUNKS || chunk_jitter_ms < 0 ||
        chunk_jitter_ms > chunk_interval_ms) {
        fprintf(stderr, "sse_upstream: --port PORT is required; --chunk-interval-ms >= 0; "
                        "--chunk-jitter-ms 0 to the interval; --stream-chunks 1 to %d\n",
                MAX_STREAM_CHUNKS);
        return 2;
    }
    rng_state = now_ns() ^ ((uint64_t)getpid() << 32) ^ 0x9E3779B97F4A7C15ULL;
    signal(SIGPIPE, SIG_IGN);
    int listener = open_loopback_listener(port, "sse_upstream");
    if (listener < 0) return 1;
    int one = 1;
    int epfd = epoll_create1(0);
    int timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    static int listener_tag, timer_tag;
    struct epoll_event event = {.events = EPOLLIN, .data.ptr = &listener_tag};
    epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &event);
    struct epoll_event timer_event = {.events = EPOLLIN, .data.ptr = &timer_tag};
    epoll_ctl(epfd, EPOLL_CTL_ADD, timer_fd, &timer_event);
    struct epoll_event events[EVENTS_PER_WAIT];
    unsigned char chunk[READ_CHUNK_BYTES];
    for (;;) {
        int ready = epoll_wait(epfd, events, EVENTS_PER_WAIT, -1);
        if (ready < 0 && errno != EINTR) return 1;
        for (int i = 0; i < ready; i++) {
            void *tag = events[i].data.ptr;
            if (tag == &listener_tag) {
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
            if (tag == &timer_tag) {
                uint64_t expirations;
                if (read(timer_fd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
                    return 1;
                armed_due = 0; /* a one-shot timer: it fired */
                uint64_t now = now_ns();
                while (queue_head && queue_head->due_ns <= now) {
                    struct conn *due = queue_head;
                    dequeue(due);
                    if (advance(epfd, due)) end_conn(epfd, due);
                }
                arm(timer_fd);
                continue;
            }
            struct conn *c = tag;
            if (c->dead) continue;
            int failed = 0;
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                for (;;) {
                    ssize_t got = recv(c->fd, chunk, sizeof chunk, 0);
                    if (got > 0) {
                        if (c->in.len - c->in.pos + (size_t)got > HEAD_MAX_BYTES + BODY_MAX_BYTES ||
                            buffer_append(&c->in, chunk, (size_t)got))
                            failed = 1;
                        if ((size_t)got < sizeof chunk) break;
                    } else if (got == 0) {
                        failed = 1; /* the client left: its stream ends here */
                        break;
                    } else {
                        if (errno != EAGAIN && errno != EWOULDBLOCK) failed = 1;
                        break;
                    }
                }
                if (!failed && handle_requests(epfd, c)) failed = 1;
            }
            if (!failed && (events[i].events & EPOLLOUT)) {
                int flushed = flush(c);
                if (flushed < 0) {
                    failed = 1;
                } else if (flushed) {
                    struct epoll_event modify = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &modify);
                    c->watching_out = 0;
                    if (c->close_after && !c->streaming) failed = 1;
                }
            }
            if (failed) end_conn(epfd, c);
        }
        /* a stream started or ended above may have changed the queue's head */
        arm(timer_fd);
        bury();
    }
}
