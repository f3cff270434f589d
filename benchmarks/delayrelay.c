/*
 * delayrelay: a TCP relay on 127.0.0.1 that holds every chunk of bytes for a
 * fixed time in each direction, standing in for `tc netem delay` (which this
 * kernel lacks).  Part of shardcache's benchmarks (benchmarks/client_bench.py
 * builds it with gcc on first use, into a cache directory outside the repo).
 *
 *   delayrelay DELAY_US TARGET_PORT [TARGET_PORT ...]
 *
 * For each TARGET_PORT it listens on a free port of 127.0.0.1 and relays each
 * connection accepted there to 127.0.0.1:TARGET_PORT.  Once all the listeners
 * accept connections it prints "PORT <p1> <p2> ..." (one per target, in order)
 * on stdout.  It exits when its stdin reaches end of file (the parent closed
 * it or died) or on SIGTERM/SIGINT.
 *
 * Model: one thread, one epoll loop, one timerfd.  Every chunk read from a
 * socket is stamped due = now + DELAY and appended to one global FIFO.  As the
 * delay is the same for every chunk and the clock is monotonic, that FIFO is
 * already sorted by due time, so a single absolute timer armed for its head is
 * enough: no heap, no thread per connection.  When a chunk is due it is
 * written to the other socket (buffered if the socket is full).  Pipelined
 * bytes are delayed, never serialised, like netem with a fixed delay and no
 * rate limit; request and reply are each delayed, so a round trip gains
 * 2 * DELAY.  End of stream travels through the FIFO too (a half-close is
 * delayed like data).  A direction with more than LIMIT bytes queued stops
 * reading until it drains (bounded memory).
 *
 * Only 127.0.0.1 is ever bound or connected to.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define READ_SIZE 65536
#define LIMIT (8u << 20) /* queued bytes per direction before reading pauses */
#define MAX_EVENTS 64

struct conn;

typedef struct item { /* one chunk in the global FIFO; len 0 = end of stream */
    struct item *next;
    struct conn *conn;
    int dir;
    uint64_t due_ns;
    size_t len;
    char data[];
} item;

typedef struct { /* one direction: reads fd[dir], writes fd[1 - dir] */
    char *buf;       /* due bytes not yet accepted by the destination */
    size_t off, len, cap;
    size_t queued;   /* bytes in the FIFO, not yet due */
    int eof_read;    /* end of stream seen on the source */
    int eof_due;     /* ... and its delay has elapsed */
    int shut;        /* SHUT_WR done on the destination */
    int blocked;     /* destination full: waiting for EPOLLOUT */
} direction;

typedef struct {
    struct conn *conn;
    int side; /* 0 client socket, 1 upstream socket */
} endpoint;

typedef struct conn {
    int fd[2];
    endpoint ep[2];
    direction d[2]; /* d[0] client -> upstream, d[1] upstream -> client */
    uint32_t mask[2];
    int registered[2]; /* fd[s] is in the epoll set */
    int refs;          /* FIFO items that point here */
    int dead;          /* sockets closed; freed once unused, after the current batch of events */
    struct conn *next_dead;
} conn;

static int ep_fd, timer_fd;
static uint64_t delay_ns;
static item *fifo_head, *fifo_tail;
static conn *graveyard; /* dead, unused connections: freed between batches of events */
static const char tag_timer = 'T', tag_stdin = 'S';

#define MAX_TARGETS 64
typedef struct {
    int fd;
    int target_port;
} listener_t;
static listener_t listeners[MAX_TARGETS];
static int n_listeners;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void arm_timer(void) {
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    if (fifo_head) {
        its.it_value.tv_sec = (time_t)(fifo_head->due_ns / 1000000000u);
        its.it_value.tv_nsec = (long)(fifo_head->due_ns % 1000000000u);
        if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    }
    if (timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &its, NULL) < 0) die("timerfd_settime");
}

static void conn_free_if_unused(conn *c) {
    if (c->dead && c->refs == 0) { /* later events of this batch may still point at it */
        c->next_dead = graveyard;
        graveyard = c;
    }
}

static void bury(void) {
    while (graveyard) {
        conn *c = graveyard;
        graveyard = c->next_dead;
        free(c->d[0].buf);
        free(c->d[1].buf);
        free(c);
    }
}

static void conn_kill(conn *c) {
    if (c->dead) return;
    c->dead = 1;
    close(c->fd[0]); /* closing removes them from the epoll set */
    close(c->fd[1]);
    conn_free_if_unused(c);
}

/* Register the events side s needs: readable if direction s may read, writable if direction 1-s is
 * blocked on it.  EPOLLRDHUP is not used: a half-close arrives as a 0-byte read. */
static void update_mask(conn *c, int s) {
    direction *rd = &c->d[s], *wr = &c->d[1 - s];
    uint32_t m = 0;
    if (!rd->eof_read && rd->queued + (rd->len - rd->off) < LIMIT) m |= EPOLLIN;
    if (wr->blocked) m |= EPOLLOUT;
    if (!c->registered[s] || m == c->mask[s]) return;
    struct epoll_event ev = {.events = m, .data.ptr = &c->ep[s]};
    if (epoll_ctl(ep_fd, EPOLL_CTL_MOD, c->fd[s], &ev) < 0) die("epoll_ctl MOD");
    c->mask[s] = m;
}

/* Write what is due in direction `dir`; after the last byte, pass a due end of stream on. */
static void flush(conn *c, int dir) {
    direction *d = &c->d[dir];
    int dst = c->fd[1 - dir];
    while (d->off < d->len) {
        ssize_t w = send(dst, d->buf + d->off, d->len - d->off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            d->off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            d->blocked = 1;
            update_mask(c, 1 - dir);
            return;
        } else {
            conn_kill(c);
            return;
        }
    }
    d->off = d->len = 0;
    d->blocked = 0;
    if (d->eof_due && !d->shut) {
        shutdown(dst, SHUT_WR);
        d->shut = 1;
        if (c->d[0].shut && c->d[1].shut) {
            conn_kill(c);
            return;
        }
    }
    update_mask(c, 1 - dir);
    update_mask(c, dir); /* reading may resume now that the backlog shrank */
}

static void deliver(item *it) {
    conn *c = it->conn;
    c->refs--;
    if (c->dead) {
        conn_free_if_unused(c);
        return;
    }
    direction *d = &c->d[it->dir];
    if (it->len == 0) {
        d->eof_due = 1;
    } else {
        d->queued -= it->len;
        if (d->len + it->len > d->cap) {
            size_t cap = d->cap ? d->cap : READ_SIZE;
            while (cap < d->len + it->len) cap *= 2;
            char *buf = realloc(d->buf, cap);
            if (!buf) die("realloc");
            d->buf = buf;
            d->cap = cap;
        }
        memcpy(d->buf + d->len, it->data, it->len);
        d->len += it->len;
    }
    if (!d->blocked) flush(c, it->dir);
}

static void on_timer(void) {
    uint64_t expirations;
    if (read(timer_fd, &expirations, sizeof expirations) < 0 && errno != EAGAIN) die("read timerfd");
    uint64_t now = now_ns();
    while (fifo_head && fifo_head->due_ns <= now) {
        item *it = fifo_head;
        fifo_head = it->next;
        if (!fifo_head) fifo_tail = NULL;
        deliver(it);
        free(it);
    }
    arm_timer();
}

static void enqueue(conn *c, int dir, const char *data, size_t len) {
    item *it = malloc(sizeof(item) + len);
    if (!it) die("malloc");
    it->next = NULL;
    it->conn = c;
    it->dir = dir;
    it->due_ns = now_ns() + delay_ns;
    it->len = len;
    if (len) memcpy(it->data, data, len);
    c->refs++;
    c->d[dir].queued += len;
    int was_empty = fifo_head == NULL;
    if (fifo_tail) fifo_tail->next = it; else fifo_head = it;
    fifo_tail = it;
    if (was_empty) arm_timer();
}

static void on_readable(conn *c, int s) {
    static char buf[READ_SIZE];
    direction *d = &c->d[s];
    if (d->eof_read) return;
    ssize_t n = recv(c->fd[s], buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) {
        enqueue(c, s, buf, (size_t)n);
    } else if (n == 0) {
        d->eof_read = 1;
        enqueue(c, s, NULL, 0);
    } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
        return;
    } else {
        conn_kill(c); /* reset: drop both sides at once */
        return;
    }
    update_mask(c, s);
}

static void on_accept(int listener, int target_port) {
    for (;;) {
        int cfd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
            if (errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) return;
            die("accept4");
        }
        int ufd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (ufd < 0) die("socket");
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)target_port)};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(ufd, (struct sockaddr *)&sa, sizeof sa) < 0) { /* loopback: immediate */
            close(ufd);
            close(cfd);
            continue;
        }
        int one = 1;
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(ufd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int fl = fcntl(ufd, F_GETFL);
        if (fl < 0 || fcntl(ufd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
        conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd[0] = cfd;
        c->fd[1] = ufd;
        for (int s = 0; s < 2; s++) {
            c->ep[s].conn = c;
            c->ep[s].side = s;
            c->mask[s] = EPOLLIN;
            c->registered[s] = 1;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &c->ep[s]};
            if (epoll_ctl(ep_fd, EPOLL_CTL_ADD, c->fd[s], &ev) < 0) die("epoll_ctl ADD");
        }
    }
}

static int parse_int(const char *text, long lo, long hi, const char *what) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || *end || end == text || v < lo || v > hi) {
        fprintf(stderr, "delayrelay: bad %s %s\n", what, text);
        exit(2);
    }
    return (int)v;
}

static int open_listener(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(fd, 128) < 0) die("listen");
    return fd;
}

static int local_port(int fd) {
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    if (getsockname(fd, (struct sockaddr *)&sa, &len) < 0) die("getsockname");
    return ntohs(sa.sin_port);
}

int main(int argc, char **argv) {
    if (argc < 3 || argc - 2 > MAX_TARGETS) {
        fprintf(stderr, "usage: delayrelay DELAY_US TARGET_PORT [TARGET_PORT ...] (at most %d)\n",
                MAX_TARGETS);
        return 2;
    }
    delay_ns = (uint64_t)parse_int(argv[1], 0, 10000000, "DELAY_US") * 1000u;

    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* wake on time, not up to 50 us late */
    prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0);

    ep_fd = epoll_create1(EPOLL_CLOEXEC);
    timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (ep_fd < 0 || timer_fd < 0) die("epoll_create1/timerfd_create");
    struct epoll_event ev = {.events = EPOLLIN};
    for (int i = 2; i < argc; i++) {
        listener_t *l = &listeners[n_listeners++];
        l->target_port = parse_int(argv[i], 1, 65535, "TARGET_PORT");
        l->fd = open_listener();
        ev.data.ptr = l;
        if (epoll_ctl(ep_fd, EPOLL_CTL_ADD, l->fd, &ev) < 0) die("epoll_ctl listener");
    }
    ev.data.ptr = (void *)&tag_timer;
    if (epoll_ctl(ep_fd, EPOLL_CTL_ADD, timer_fd, &ev) < 0) die("epoll_ctl timer");
    ev.data.ptr = (void *)&tag_stdin;
    if (epoll_ctl(ep_fd, EPOLL_CTL_ADD, STDIN_FILENO, &ev) < 0) die("epoll_ctl stdin (a pipe is needed)");

    printf("PORT");
    for (int i = 0; i < n_listeners; i++) printf(" %d", local_port(listeners[i].fd));
    printf("\n");
    fflush(stdout);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep_fd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        int timer_fired = 0;
        for (int i = 0; i < n; i++) {
            void *tag = events[i].data.ptr;
            uint32_t e = events[i].events;
            if (tag >= (void *)listeners && tag < (void *)(listeners + n_listeners)) {
                listener_t *l = tag;
                on_accept(l->fd, l->target_port);
            } else if (tag == &tag_timer) {
                timer_fired = 1;
            } else if (tag == &tag_stdin) {
                char buf[256];
                ssize_t r = read(STDIN_FILENO, buf, sizeof buf);
                if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) return 0;
            } else {
                endpoint *ep = tag;
                conn *c = ep->conn;
                int s = ep->side;
                if (c->dead) continue; /* killed earlier in this batch; freed after it */
                if (e & EPOLLERR) {
                    conn_kill(c);
                    continue;
                }
                if ((e & EPOLLHUP) && c->d[s].eof_read) {
                    /* both ways shut on this socket: nothing left to read; EPOLLHUP cannot be
                     * masked, so leave the epoll set (or drop the connection if bytes were still
                     * to be written to it: then the peer reset it) */
                    if (!c->d[1 - s].shut) {
                        conn_kill(c);
                    } else {
                        epoll_ctl(ep_fd, EPOLL_CTL_DEL, c->fd[s], NULL);
                        c->registered[s] = 0;
                    }
                    continue;
                }
                if ((e & EPOLLOUT) && c->d[1 - s].blocked) {
                    c->d[1 - s].blocked = 0;
                    flush(c, 1 - s);
                    if (c->dead) continue;
                }
                if (e & (EPOLLIN | EPOLLHUP)) on_readable(c, s);
            }
        }
        if (timer_fired) on_timer();
        bury();
    }
}
