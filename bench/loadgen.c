/* loadgen.c - open-loop HTTP/1.1 keep-alive GET driver for loopback benches; built
 * and run by bench/loadgen.py (`python -m bench.loadgen --help`).
 *
 *   loadgen HOST PORT PATH RATE_PER_S DURATION_S CONNECTIONS [TIMEOUT_S [LATENCIES_PATH]]
 *
 * Request i is due at t0 + i/RATE (wrk2-style, no coordinated omission): it goes out
 * at its due time on a free keep-alive connection, or waits in a queue with its
 * latency still counted from the due time. Latency = answer fully read (status,
 * headers, Content-Length body) - due time. One request per connection at a time;
 * a timerfd wakes the epoll loop at the next due time with ns resolution.
 *
 * A keep-alive connection the server closed while idle (aiohttp after its keep-alive
 * timeout) can cross a request sent on it: a reused connection that ends before any
 * byte of the answer is tried once more on a new connection, as HTTP clients do for
 * an idempotent GET (RFC 9110 9.2.2), latency still from the due time; counted in
 * "retried", not an error.
 *
 * Errors: connect failures, non-2xx answers, connections closed or reset under a
 * request (after that one retry), answers without Content-Length (chunked is not supported: aiohttp
 * sends Content-Length), requests outstanding longer than TIMEOUT_S (default 5),
 * and requests still unsent TIMEOUT_S after the last one was due.
 *
 * Prints one JSON object: requests (scheduled), count (complete answers of any
 * status: the latency percentiles are over these), ok (2xx), errors (requests -
 * ok), errors_by kind, retried, p50/p90/p99/p999/max in ms (null when count is 0), and
 * send_lag_p99: the driver's own lateness, from when a request was due and a
 * connection was free for it to when it went out, in ms. With LATENCIES_PATH, every
 * complete answer's latency (ms, sorted, one per line) is written there too, so a
 * caller can pool several runs into one distribution.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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

enum state { DEAD, CONNECTING, IDLE, BUSY };
enum err { E_CONNECT, E_STATUS, E_CLOSED, E_PROTOCOL, E_TIMEOUT, E_UNSENT, E_KINDS };
static const char *ERR_NAMES[E_KINDS] = {"connect", "status", "closed", "protocol", "timeout", "unsent"};
#define TIMER_TAG UINT32_MAX
#define HEAD_MAX 16384

struct conn {
    int fd;
    enum state state;
    long req;        /* request on the wire (or waiting for the connect), -1: none */
    double sent_s;   /* when it went out or the connect started: for the timeout */
    char head[HEAD_MAX];
    size_t head_len; /* header bytes read so far */
    long body_left;  /* -1 while reading the headers */
    int status;
    long served;     /* answers completed since it was opened: > 0 means reused */
};

static struct sockaddr_in addr;
static char request[2048];
static size_t request_len;
static double t0_s, rate_per_s, timeout_s = 5.0;
static long total, next_req, resolved, count, ok, errors_by[E_KINDS], retried;
static double *latency_ms, *lag_ms; /* lag: the driver's own lateness per request */
static long lagged;
static double unblocked_s; /* when a connection last freed up for a queue that was waiting on one */
static int blocked;
static struct conn *conns;
static int nconns, ep, tfd;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double due_s(long i) { return t0_s + (double)i / rate_per_s; }

static void watch(struct conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(ep, op, c->fd, &ev);
}

static void usable(void) {
    if (blocked) unblocked_s = now_s(), blocked = 0;
}

static void conn_close(struct conn *c) {
    usable(); /* a dead connection is reopened for the next request */
    if (c->fd >= 0) close(c->fd); /* close() also drops it from the epoll set */
    c->fd = -1;
    c->state = DEAD;
    c->req = -1;
}

static void conn_open(struct conn *c, long req);

/* A reused connection that ended before any byte of its answer: the server closed it
 * while idle. The request goes again, once, on a new connection (which is not reused). */
static int retry_stale(struct conn *c) {
    if (c->req < 0 || c->served == 0 || c->head_len != 0) return 0;
    long req = c->req;
    c->req = -1;
    conn_close(c);
    retried++;
    conn_open(c, req);
    return 1;
}

/* The request on `c` (if any) ends as an error of `kind`; the connection is dropped. */
static void fail(struct conn *c, enum err kind) {
    if (c->req >= 0) {
        errors_by[kind]++;
        resolved++;
    }
    conn_close(c);
}

/* Start a non-blocking connect; `req` (or -1) goes out once it is established. */
static void conn_open(struct conn *c, long req) {
    int one = 1;
    c->req = req;
    c->served = 0;
    c->sent_s = now_s();
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { fail(c, E_CONNECT); return; }
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        fail(c, E_CONNECT);
        return;
    }
    c->state = CONNECTING;
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
}

static void send_on(struct conn *c, long req) {
    c->req = req;
    c->sent_s = now_s();
    c->head_len = 0;
    c->body_left = -1;
    if (send(c->fd, request, request_len, MSG_NOSIGNAL) != (ssize_t)request_len) {
        if (!retry_stale(c)) fail(c, E_CLOSED);
        return;
    }
    c->state = BUSY;
}

static void on_connected(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) { fail(c, E_CONNECT); return; }
    watch(c, EPOLLIN, EPOLL_CTL_MOD);
    c->state = IDLE;
    if (c->req >= 0) send_on(c, c->req);
    else usable();
}

/* Headers are complete in c->head[0..end): status, Content-Length, keep-alive. */
static int parse_head(struct conn *c, size_t end, int *keep_alive) {
    long length = -1;
    if (end < 12 || strncmp(c->head, "HTTP/1.", 7) != 0) return -1;
    c->status = atoi(c->head + 9);
    *keep_alive = strncmp(c->head, "HTTP/1.1", 8) == 0;
    for (char *line = strstr(c->head, "\r\n"); line && line < c->head + end; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "content-length:", 15) == 0) length = atol(line + 17);
        else if (strncasecmp(line + 2, "connection:", 11) == 0) *keep_alive = strncasecmp(line + 13 + strspn(line + 13, " \t"), "close", 5) != 0;
    }
    if (length < 0) return -1;
    c->body_left = length - (long)(c->head_len - end);
    return 0;
}

static void complete(struct conn *c, int keep_alive) {
    latency_ms[count++] = (now_s() - due_s(c->req)) * 1000.0;
    if (c->status >= 200 && c->status < 300) ok++;
    else errors_by[E_STATUS]++;
    resolved++;
    c->served++;
    c->req = -1;
    c->state = IDLE;
    usable();
    if (!keep_alive) conn_close(c);
}

static void on_readable(struct conn *c) {
    static char scratch[65536];
    int keep_alive = 1;
    for (;;) {
        int in_head = c->body_left < 0;
        char *into = in_head ? c->head + c->head_len : scratch;
        size_t room = in_head ? HEAD_MAX - 1 - c->head_len : sizeof scratch;
        ssize_t n = read(c->fd, into, room);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n <= 0 || c->state != BUSY) {
            if (!(c->state == BUSY && retry_stale(c))) fail(c, E_CLOSED);
            return;
        }
        if (in_head) {
            c->head_len += (size_t)n;
            c->head[c->head_len] = '\0';
            char *end = strstr(c->head, "\r\n\r\n");
            if (!end && c->head_len >= HEAD_MAX - 1) { fail(c, E_PROTOCOL); return; }
            if (!end) continue;
            if (parse_head(c, (size_t)(end + 4 - c->head), &keep_alive) < 0) { fail(c, E_PROTOCOL); return; }
        } else {
            c->body_left -= n;
        }
        if (c->body_left <= 0) { complete(c, keep_alive); return; }
    }
}

/* Send every request that is due, on an idle connection or a new one; the rest wait. */
static void dispatch(double now) {
    while (next_req < total && due_s(next_req) <= now) {
        struct conn *idle = NULL, *dead = NULL;
        for (int i = 0; i < nconns && !idle; i++) {
            if (conns[i].state == IDLE) idle = &conns[i];
            else if (conns[i].state == DEAD && !dead) dead = &conns[i];
        }
        if (!idle && !dead) { blocked = 1; break; } /* queued: latency still counts from the due time */
        double ready_s = due_s(next_req) > unblocked_s ? due_s(next_req) : unblocked_s;
        lag_ms[lagged++] = (now_s() - ready_s) * 1000.0;
        if (idle) send_on(idle, next_req++);
        else conn_open(dead, next_req++);
    }
    struct itimerspec at = {0};
    if (next_req < total && due_s(next_req) > now) { /* else: a freed connection wakes us */
        double due = due_s(next_req);
        at.it_value.tv_sec = (time_t)due;
        at.it_value.tv_nsec = (long)((due - (double)(time_t)due) * 1e9);
    }
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &at, NULL);
}

static void expire(double now) {
    for (int i = 0; i < nconns; i++)
        if ((conns[i].req >= 0 || conns[i].state == CONNECTING) && now - conns[i].sent_s > timeout_s)
            fail(&conns[i], E_TIMEOUT);
}

static void on_event(struct epoll_event *ev) {
    if (ev->data.u32 == TIMER_TAG) {
        uint64_t expirations;
        if (read(tfd, &expirations, sizeof expirations) < 0) { /* spurious wake-up: nothing to do */ }
        return;
    }
    struct conn *c = &conns[ev->data.u32];
    if (c->state == CONNECTING) on_connected(c);
    else if (c->state != DEAD) on_readable(c);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Linear interpolation between closest ranks of sorted `v`, as bench/common.py's percentile(). */
static void print_quantile(const char *name, const double *v, long n, double q) {
    if (n == 0) { printf(", \"%s\": null", name); return; }
    double rank = (double)(n - 1) * q;
    long low = (long)rank, high = low + 1 < n ? low + 1 : low;
    printf(", \"%s\": %.4f", name, v[low] + (v[high] - v[low]) * (rank - (double)low));
}

static int dump_latencies(const char *path) {
    FILE *f = fopen(path, "w");
    if (f == NULL) { perror(path); return -1; }
    for (long i = 0; i < count; i++) fprintf(f, "%.4f\n", latency_ms[i]);
    if (fclose(f) != 0) { perror(path); return -1; }
    return 0;
}

static void report(void) {
    qsort(latency_ms, (size_t)count, sizeof *latency_ms, by_value);
    qsort(lag_ms, (size_t)lagged, sizeof *lag_ms, by_value);
    printf("{\"requests\": %ld, \"count\": %ld, \"ok\": %ld, \"errors\": %ld, \"errors_by\": {", total, count, ok, total - ok);
    for (int k = 0; k < E_KINDS; k++) printf("%s\"%s\": %ld", k ? ", " : "", ERR_NAMES[k], errors_by[k]);
    printf("}, \"retried\": %ld", retried);
    static const char *names[] = {"p50", "p90", "p99", "p999", "max"};
    static const double qs[] = {0.5, 0.9, 0.99, 0.999, 1.0};
    for (int i = 0; i < 5; i++) print_quantile(names[i], latency_ms, count, qs[i]);
    print_quantile("send_lag_p99", lag_ms, lagged, 0.99);
    printf("}\n");
}

static void connect_all(void) {
    for (int i = 0; i < nconns; i++) conn_open(&conns[i], -1);
    struct epoll_event events[256];
    for (double until_s = now_s() + 2.0; now_s() < until_s;) {
        int pending = 0;
        for (int i = 0; i < nconns; i++) pending += conns[i].state == CONNECTING;
        if (!pending) return;
        int n = epoll_wait(ep, events, 256, 10);
        for (int i = 0; i < n; i++) on_event(&events[i]);
    }
}

int main(int argc, char **argv) {
    if (argc < 7 || argc > 9) {
        fprintf(stderr, "usage: %s HOST PORT PATH RATE_PER_S DURATION_S CONNECTIONS [TIMEOUT_S [LATENCIES_PATH]]\n", argv[0]);
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[2]));
    rate_per_s = atof(argv[4]);
    nconns = atoi(argv[6]);
    if (argc >= 8) timeout_s = atof(argv[7]);
    total = (long)(rate_per_s * atof(argv[5]) + 0.5);
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1 || rate_per_s <= 0 || nconns < 1 || total < 1) {
        fprintf(stderr, "loadgen: need a numeric IPv4 host, a positive rate, duration and connection count\n");
        return 2;
    }
    request_len = (size_t)snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: %s:%s\r\n\r\n", argv[3], argv[1], argv[2]);
    latency_ms = calloc((size_t)total, sizeof *latency_ms);
    lag_ms = calloc((size_t)total, sizeof *lag_ms);
    conns = calloc((size_t)nconns, sizeof *conns);
    ep = epoll_create1(0);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = TIMER_TAG};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);
    for (int i = 0; i < nconns; i++) conns[i].fd = -1, conns[i].req = -1;
    connect_all();
    t0_s = now_s() + 0.01;
    double give_up_s = due_s(total - 1) + timeout_s;
    struct epoll_event events[256];
    dispatch(now_s());
    while (resolved < total && now_s() < give_up_s) {
        int n = epoll_wait(ep, events, 256, 10);
        for (int i = 0; i < n; i++) on_event(&events[i]);
        double now = now_s();
        expire(now);
        dispatch(now);
    }
    expire(give_up_s + timeout_s + 1.0); /* still on the wire at the end: timed out */
    errors_by[E_UNSENT] += total - next_req;
    report();
    return argc == 9 && dump_latencies(argv[8]) != 0 ? 1 : 0;
}
