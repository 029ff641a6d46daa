/* portfwd.relay._native: the splice path's per-connection work (accept, connect, relay) in C.
 *
 * Why C, and by hand: a relayed connection costs the kernel about 33 us of system time on
 * this bench, and the interpreter another 20-25 us around the same 17 system calls (accept,
 * two socket objects, a connect, six splices, the close: bench/RESULTS.md, "Workers, measured
 * why"). haproxy spends 5 us of user time. No maintained library relays two sockets with
 * splice(2) from one epoll set for Python; asyncio and uvloop give a callback per socket event,
 * which is where the time goes. So this module does, for the rules that need nothing more, what
 * relay/listener.py (DescriptorListener), relay/upstream.py (Connect), relay/forwarder.py
 * (TcpForwarder) and relay/splice.py (SpliceRelay) do in Python, with the same semantics:
 *
 *   - accept in bursts (64), pause a listener that runs out of descriptors (told to Python);
 *   - a draining listener resets its new clients (SO_LINGER 0);
 *   - connect to one literal address, ask a loopback connect how it went at once, time out;
 *   - relay with one pipe per direction lent per burst from a pool, 8 splices per wake-up,
 *     the FIN passed on with the last bytes (EPOLLRDHUP), half-close kept, and the same
 *     reasons a session ends with ("client closed", "upstream reset", ...);
 *   - upstream TCP keepalive turned on once a session outlives one to two seconds.
 *
 * Everything else (the session's records, status, logs, limits, allow/deny) stays in Python:
 * `run()` hands back a list of events (a session opened, a connect failed, a listener ran
 * out of descriptors), and a Link's `close(reason)` (the state asked: idle, shutdown, an
 * operator) calls the engine's `closed` callback at once. The relay/native.py module docstring
 * says which rules take this path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

/* epoll data: a pointer with its kind in the low bits (every pointer here is 16-aligned). */
#define TAG_LISTENER 1u
#define TAG_CLIENT 2u
#define TAG_UPSTREAM 3u
#define TAG_TIMER 4u
#define TAG_MASK 7u

#define ACCEPT_BATCH 64
#define EVENTS_PER_RUN 256
#define ROUNDS_PER_WAKEUP 8
/* A direction starts by copying (recv, send) through this much stack; a read that fills it
 * marks a bulk stream, which splice moves from then on (haproxy's `splice-auto`). For the
 * small messages of a request and its answer a copy is cheaper than two splices through a
 * pipe, and such a session never takes a pipe. What a send leaves waits in a pipe: 8 KiB fits
 * the smallest one Linux makes (two pages, for a user over `pipe-user-pages-soft`). */
#define COPY_BYTES 8192
#define POOL_CAPACITY 64
/* How often the timer looks at connects under way and at sessions due their keepalive. */
#define TICK_NS 100000000LL
/* A session's upstream keepalive is turned on once it has lived this long (latekeepalive.py). */
#define KEEPALIVE_AFTER_NS 1000000000LL

/* Event kinds, as relay/native.py reads them. */
enum { EV_OPEN = 0, EV_FAILED = 1, EV_EXHAUSTED = 2, EV_REFUSED = 3, EV_ACCEPT_FAILED = 4, EV_CLOSED = 5 };
/* How a connect failed (EV_FAILED's third field). */
enum { FAIL_CONNECT = 0, FAIL_SOCKET = 1, FAIL_TIMEOUT = 2, FAIL_PROXY = 3 };
/* WAITING: a connect to one of several backends failed; Python picks the next (Link.connect)
 * or gives up (Link.fail), with the client kept open meanwhile. */
enum { CONNECTING = 0, RELAYING = 1, CLOSED = 2, WAITING = 3 };
/* Who writes a session's open and closed lines (run()'s argument). */
enum { LINES_PYTHON = 0, LINES_TEXT = 1, LINES_JSON = 2 };
enum { BALANCE_PYTHON = 0, BALANCE_ROUND_ROBIN = 1, BALANCE_FIRST = 2 };
#define EV_LINES 6
#define EV_DENIED 7
#define EV_RETRY 8
/* The most of a client's first bytes that go in one send with a PROXY header (proxyout.py). */
#define FIRST_BYTES 4096

typedef struct {
    int pipe_r, pipe_w;
    size_t pending; /* bytes in the pipe */
    int eof;        /* the source said EOF */
    int reading;    /* waiting for the source to be readable */
    int blocked;    /* waiting for the destination to be writable */
    int spliced;    /* a read filled COPY_BYTES: bulk, moved by splice from now on */
} Direction;

struct Engine;

typedef struct Link {
    PyObject_HEAD
    struct Engine *engine; /* strong */
    PyObject *token;       /* strong: the forwarder that opened it (relay/native.py) */
    PyObject *session;     /* strong: set by Python once the session is recorded */
    PyObject *client_text; /* strong */
    PyObject *texts;       /* strong: its listener's (label, label in JSON, target, target in JSON) */
    int client, upstream;
    int state;
    Direction up, down; /* up: client -> upstream */
    unsigned client_mask, upstream_mask;
    int done; /* 0, or the side that finished first: 1 client, 2 upstream */
    int keepalive;
    unsigned long long bytes_up, bytes_down;
    int64_t began_ns;    /* monotonic: when the client was accepted */
    int64_t opened_ns;   /* monotonic: when its upstream connected (the session's start) */
    int64_t deadline_ns; /* connecting: when the connect times out */
    double timeout;      /* connecting: the timeout, for its message */
    struct sockaddr_storage target;
    socklen_t target_len;
    int backend;   /* which of its listener's targets (several: a rule's backends) */
    int failover;  /* a failed connect is Python's to retry elsewhere (EV_RETRY) */
    int counted;   /* its backend's `active` was counted at the pick (Python's picker) */
    int proxy;     /* 0, or the PROXY protocol version its upstream is sent first */
    struct sockaddr_storage peer, local; /* for that header: the client, the address it reached */
    socklen_t local_len;                 /* 0: ask the client's socket */
    struct Link *prev, *next; /* the engine's connecting list, or its keepalive queue */
    int queued;               /* on one of those lists */
} Link;

/* One network of an allow or deny list. */
typedef struct {
    int family; /* AF_INET or AF_INET6 */
    int prefix;
    unsigned char address[16];
} Network;

typedef struct {
    struct sockaddr_storage address;
    socklen_t length;
} Target;

typedef struct Listener {
    int fd;
    Network *allow, *deny; /* PyMem arrays, or NULL */
    Py_ssize_t allows, denies;
    Target *targets;   /* PyMem array: the one target, or the rule's backends in order */
    Py_ssize_t ntargets;
    PyObject *picker;  /* strong or NULL: picker(client) -> (backend, seconds) with several */
    /* While the rule's pool says every backend is healthy (`healthy`, a bytearray its Pool
     * keeps), round-robin and first pick here as balance.py would, without calling Python. */
    int balance;       /* BALANCE_PYTHON, BALANCE_ROUND_ROBIN or BALANCE_FIRST */
    int *weights;      /* PyMem array, one a target: 0 for a backup */
    long *current;     /* smooth weighted round-robin's running weights */
    PyObject *healthy; /* strong bytearray, or NULL */
    double attempt;    /* each backend's share of the connect timeout */
    int proxy;
    struct sockaddr_storage local;
    socklen_t local_len;
    int watched;  /* in the epoll set */
    int refusing; /* draining: new clients are reset */
    int keepalive;
    PyObject *token; /* strong */
    PyObject *texts; /* strong: (label, label in JSON, target, target in JSON) for the log lines */
    double timeout;
    struct Listener *next;
} Listener;

typedef struct Engine {
    PyObject_HEAD
    int epoll;
    int timer;
    int timer_armed;
    size_t pipe_size;
    int ka_idle, ka_interval, ka_count;
    int pool[POOL_CAPACITY][2];
    int pooled;
    Listener *listeners;
    Link connecting; /* sentinel of the connecting list (only prev/next used) */
    Link waiting;    /* sentinel of the keepalive queue, oldest first */
    PyObject *events;   /* list, or NULL */
    PyObject *closed;   /* callable(link, reason): a close Python asked for */
    long live;          /* links not yet closed */
    Link *buried;       /* ended inside run(): released once its batch is done */
    int lines;          /* this run(): 0 Python logs, LINES_TEXT or LINES_JSON: the engine writes */
    int lines_known;    /* `lines` was asked for in this run() (`mode`, once, when a line is due) */
    int running;        /* inside run()'s batch: Python called from it must not free what it uses */
    PyObject *mode;     /* callable() -> lines, or NULL */
    PyObject *dispatch; /* callable(events, lines), or NULL: run() returns the events instead */
    PyObject *written;  /* this run()'s log lines (a list), or NULL */
    time_t second;      /* the second `stamp` was made for */
    char stamp[48];     /* "YYYY-mm-dd HH:MM:SS INFO " of that second */
} Engine;

static PyTypeObject LinkType;
static PyTypeObject EngineType;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Python called from inside run()'s batch (a picker, `mode`) must not free what the batch
 * uses: the methods that would raise instead. */
static int not_running(Engine *engine) {
    if (!engine->running) return 1;
    PyErr_SetString(PyExc_RuntimeError, "not while the engine runs a batch (from a picker or mode)");
    return 0;
}

/* ------------------------------------------------------------------ lists */
static void list_init(Link *sentinel) { sentinel->prev = sentinel->next = sentinel; }

static void list_push(Link *sentinel, Link *link) {
    link->prev = sentinel->prev;
    link->next = sentinel;
    sentinel->prev->next = link;
    sentinel->prev = link;
    link->queued = 1;
}

static void list_drop(Link *link) {
    if (!link->queued) return;
    link->prev->next = link->next;
    link->next->prev = link->prev;
    link->prev = link->next = NULL;
    link->queued = 0;
}

/* Drop the engine's reference to a link that ended inside run() once the batch is done: a later
 * event of the same batch may still name it (epoll handed both of its sockets' events at once). */
static void bury(Engine *engine, Link *link) {
    link->next = engine->buried;
    engine->buried = link;
}

static void unbury(Engine *engine) {
    while (engine->buried != NULL) {
        Link *link = engine->buried;
        engine->buried = link->next;
        link->next = NULL;
        Py_DECREF(link);
    }
}

/* ------------------------------------------------------------------ events */
static int emit(Engine *engine, PyObject *event) {
    if (event == NULL) return -1;
    if (engine->events == NULL) {
        engine->events = PyList_New(0);
        if (engine->events == NULL) {
            Py_DECREF(event);
            return -1;
        }
    }
    int result = PyList_Append(engine->events, event);
    Py_DECREF(event);
    return result;
}

/* ------------------------------------------------------------------ timer */
static void arm(Engine *engine) {
    int want = engine->connecting.next != &engine->connecting || engine->waiting.next != &engine->waiting;
    if (want == engine->timer_armed) return;
    struct itimerspec spec;
    memset(&spec, 0, sizeof spec);
    if (want) {
        spec.it_value.tv_nsec = TICK_NS;
        spec.it_interval.tv_nsec = TICK_NS;
    }
    timerfd_settime(engine->timer, 0, &spec, NULL);
    engine->timer_armed = want;
}

/* ------------------------------------------------------------------ pipes */
static int pipe_take(Engine *engine, Direction *d) {
    if (engine->pooled) {
        engine->pooled--;
        d->pipe_r = engine->pool[engine->pooled][0];
        d->pipe_w = engine->pool[engine->pooled][1];
        return 0;
    }
    int ends[2];
    if (pipe2(ends, O_NONBLOCK | O_CLOEXEC) < 0) return -1;
    /* Over the per-user pipe quota the default size still works, only slower. */
    (void)fcntl(ends[1], F_SETPIPE_SZ, (int)engine->pipe_size);
    d->pipe_r = ends[0];
    d->pipe_w = ends[1];
    return 0;
}

static void pipe_give(Engine *engine, Direction *d) {
    if (d->pipe_r < 0) return;
    if (d->pending == 0 && engine->pooled < POOL_CAPACITY) {
        engine->pool[engine->pooled][0] = d->pipe_r;
        engine->pool[engine->pooled][1] = d->pipe_w;
        engine->pooled++;
    } else {
        close(d->pipe_r);
        close(d->pipe_w);
    }
    d->pipe_r = d->pipe_w = -1;
}

/* Lend the (empty) pipe back between bursts: idle sessions hold no pipe. */
static void release(Engine *engine, Direction *d) {
    if (d->pipe_r >= 0 && d->pending == 0) pipe_give(engine, d);
}

/* ------------------------------------------------------------------ links */
static Link *link_new(Engine *engine, PyObject *token, PyObject *texts, int client, PyObject *client_text) {
    Link *link = PyObject_New(Link, &LinkType);
    if (link == NULL) return NULL;
    Py_INCREF(engine);
    link->engine = engine;
    Py_INCREF(token);
    link->token = token;
    link->session = NULL;
    Py_INCREF(client_text);
    link->client_text = client_text;
    Py_INCREF(texts);
    link->texts = texts;
    link->client = client;
    link->upstream = -1;
    link->state = CONNECTING;
    memset(&link->up, 0, sizeof link->up);
    memset(&link->down, 0, sizeof link->down);
    link->up.pipe_r = link->up.pipe_w = link->down.pipe_r = link->down.pipe_w = -1;
    link->client_mask = link->upstream_mask = 0;
    link->done = 0;
    link->keepalive = 0;
    link->bytes_up = link->bytes_down = 0;
    link->began_ns = now_ns();
    link->opened_ns = link->began_ns;
    link->deadline_ns = 0;
    link->timeout = 0;
    link->target_len = 0;
    link->backend = 0;
    link->failover = 0;
    link->counted = 0;
    link->proxy = 0;
    link->local_len = 0;
    link->prev = link->next = NULL;
    link->queued = 0;
    engine->live++;
    return link;
}

static void end(Link *link, const char *reason);

/* Bring the epoll interest in `fd` (a side of `link`) in line with what its two directions
 * wait for: reading as a source, writing as a blocked destination. A session whose socket
 * cannot be watched (ENOMEM, ENOSPC) is ended rather than left to hang. */
static void watch(Link *link, int client_side) {
    if (link->state == CLOSED) return;
    Direction *source = client_side ? &link->up : &link->down;
    Direction *destination = client_side ? &link->down : &link->up;
    unsigned want = (source->reading ? (EPOLLIN | EPOLLRDHUP) : 0) | (destination->blocked ? EPOLLOUT : 0);
    unsigned *have = client_side ? &link->client_mask : &link->upstream_mask;
    if (want == *have) return;
    int fd = client_side ? link->client : link->upstream;
    struct epoll_event event;
    event.events = want;
    event.data.u64 = (uint64_t)(uintptr_t)link | (client_side ? TAG_CLIENT : TAG_UPSTREAM);
    int done;
    if (*have == 0)
        done = epoll_ctl(link->engine->epoll, EPOLL_CTL_ADD, fd, &event);
    else if (want)
        done = epoll_ctl(link->engine->epoll, EPOLL_CTL_MOD, fd, &event);
    else
        done = epoll_ctl(link->engine->epoll, EPOLL_CTL_DEL, fd, &event);
    if (done < 0 && want) {
        char reason[200];
        snprintf(reason, sizeof reason, "internal error: cannot watch a socket: %s", strerror(errno));
        end(link, reason);
        return;
    }
    *have = want;
}

/* Close both sockets and the pipes; the link says CLOSED from now on. */
static void shut(Link *link) {
    Engine *engine = link->engine;
    link->state = CLOSED;
    list_drop(link);
    if (link->client >= 0) close(link->client);
    if (link->upstream >= 0) close(link->upstream);
    link->client = link->upstream = -1;
    link->client_mask = link->upstream_mask = 0;
    pipe_give(engine, &link->up);
    pipe_give(engine, &link->down);
    engine->live--;
}

/* ------------------------------------------------------------------ log lines */
/* Who writes this run's lines: asked of `mode` once a run, at the first line due, so that a
 * wake-up with no session opening or closing runs no Python at all. */
static int lines_of(Engine *engine) {
    if (engine->lines_known) return engine->lines;
    engine->lines_known = 1;
    engine->lines = LINES_PYTHON;
    if (engine->mode == NULL) return engine->lines;
    PyObject *answer = PyObject_CallNoArgs(engine->mode);
    long value = answer != NULL ? PyLong_AsLong(answer) : -1;
    Py_XDECREF(answer);
    if (PyErr_Occurred()) {
        PyErr_WriteUnraisable(engine->mode);
        return engine->lines;
    }
    if (value >= LINES_PYTHON && value <= LINES_JSON) engine->lines = (int)value;
    return engine->lines;
}

/* The lines the front end's formatters would write for a session (cli/console.py, _Direct):
 * text "<date> <time> INFO <rule>: <client> -> <target> open (splice)" and "... closed
 * (<reason>): <n> B up, <n> B down, <s>s", or the same records as JSON objects. The rule and
 * target come made printable and JSON-escaped by Python; the client is an address (an odd
 * interface name in its scope is written as its index: plain_name). */
static const char *stamp(Engine *engine) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != engine->second || engine->stamp[0] == '\0') {
        struct tm local;
        char date[32];
        localtime_r(&ts.tv_sec, &local);
        strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &local);
        snprintf(engine->stamp, sizeof engine->stamp, "%s INFO ", date);
        engine->second = ts.tv_sec;
    }
    return engine->stamp;
}

/* time.time()'s repr, as json.dumps writes it. */
static char *wall_repr(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return PyOS_double_to_string((double)ts.tv_sec + ts.tv_nsec / 1e9, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
}

static void write_line(Engine *engine, PyObject *line) {
    if (line == NULL) {
        PyErr_Clear();
        return;
    }
    if (engine->written == NULL && (engine->written = PyList_New(0)) == NULL) {
        PyErr_Clear();
        Py_DECREF(line);
        return;
    }
    if (PyList_Append(engine->written, line) < 0) PyErr_Clear();
    Py_DECREF(line);
}

static void line_opened(Link *link) {
    Engine *engine = link->engine;
    PyObject *label = PyTuple_GET_ITEM(link->texts, 0), *label_json = PyTuple_GET_ITEM(link->texts, 1);
    PyObject *target = PyTuple_GET_ITEM(link->texts, 2), *target_json = PyTuple_GET_ITEM(link->texts, 3);
    if (engine->lines == LINES_TEXT) {
        write_line(engine, PyUnicode_FromFormat("%s%U: %U -> %U open (splice)", stamp(engine), label,
                                                link->client_text, target));
        return;
    }
    char *ts = wall_repr();
    if (ts == NULL) {
        PyErr_Clear();
        return;
    }
    write_line(engine, PyUnicode_FromFormat(
                           "{\"ts\": %s, \"level\": \"info\", \"logger\": \"portfwd.relay.forwarder\", "
                           "\"event\": \"session.open\", \"rule\": \"%U\", \"client\": \"%U\", "
                           "\"target\": \"%U\", \"path\": \"splice\", \"msg\": \"%U: %U -> %U open (splice)\"}",
                           ts, label_json, link->client_text, target_json, label_json, link->client_text,
                           target_json));
    PyMem_Free(ts);
}

static void line_closed(Link *link, const char *reason) {
    Engine *engine = link->engine;
    PyObject *label = PyTuple_GET_ITEM(link->texts, 0), *label_json = PyTuple_GET_ITEM(link->texts, 1);
    PyObject *target = PyTuple_GET_ITEM(link->texts, 2), *target_json = PyTuple_GET_ITEM(link->texts, 3);
    char *fixed = PyOS_double_to_string((double)(now_ns() - link->opened_ns) / 1e9, 'f', 3, 0, NULL);
    char duration[64];
    snprintf(duration, sizeof duration, "%s", fixed != NULL ? fixed : "0.000");
    PyMem_Free(fixed);
    PyErr_Clear();
    if (engine->lines == LINES_TEXT) {
        write_line(engine, PyUnicode_FromFormat("%s%U: %U -> %U closed (%s): %llu B up, %llu B down, %ss",
                                                stamp(engine), label, link->client_text, target, reason,
                                                link->bytes_up, link->bytes_down, duration));
        return;
    }
    /* round(duration, 3) as Python writes it: the 3-decimal text read back, then its repr. */
    char *rounded = PyOS_double_to_string(PyOS_string_to_double(duration, NULL, NULL), 'r', 0,
                                          Py_DTSF_ADD_DOT_0, NULL);
    char *ts = wall_repr();
    if (rounded == NULL || ts == NULL) {
        PyErr_Clear();
        PyMem_Free(rounded);
        PyMem_Free(ts);
        return;
    }
    write_line(engine, PyUnicode_FromFormat(
                           "{\"ts\": %s, \"level\": \"info\", \"logger\": \"portfwd.relay.forwarder\", "
                           "\"event\": \"session.closed\", \"rule\": \"%U\", \"client\": \"%U\", "
                           "\"target\": \"%U\", \"path\": \"splice\", \"reason\": \"%s\", \"bytes_up\": %llu, "
                           "\"bytes_down\": %llu, \"duration_s\": %s, \"msg\": \"%U: %U -> %U closed (%s): "
                           "%llu B up, %llu B down, %ss\"}",
                           ts, label_json, link->client_text, target_json, reason, link->bytes_up,
                           link->bytes_down, rounded, label_json, link->client_text, target_json, reason,
                           link->bytes_up, link->bytes_down, duration));
    PyMem_Free(rounded);
    PyMem_Free(ts);
}

/* End a relaying link from inside run(): its CLOSED event goes in the list. */
static void end(Link *link, const char *reason) {
    if (link->state == CLOSED) return;
    shut(link);
    if (lines_of(link->engine)) line_closed(link, reason);
    PyObject *text = PyUnicode_FromString(reason);
    if (text == NULL) {
        PyErr_Clear();
        return;
    }
    PyObject *event = Py_BuildValue("(iON)", EV_CLOSED, (PyObject *)link, text);
    if (emit(link->engine, event) < 0) PyErr_Clear();
    bury(link->engine, link); /* the engine's reference */
}

static int is_reset(int code) {
    return code == ECONNRESET || code == EPIPE || code == ECONNABORTED || code == ETIMEDOUT || code == ENOTCONN;
}

static void fail(Link *link, int code, int client_side) {
    char reason[200];
    const char *side = client_side ? "client" : "upstream";
    if (is_reset(code)) {
        snprintf(reason, sizeof reason, "%s reset", side);
    } else {
        snprintf(reason, sizeof reason, "%s error: %s", side, strerror(code));
    }
    end(link, reason);
}

/* A direction saw EOF and drained: pass the half-close on, end when both are done. */
static void finish(Link *link, Direction *d) {
    int upward = d == &link->up;
    if (link->done) {
        end(link, link->done == 1 ? "client closed" : "upstream closed");
        return;
    }
    link->done = upward ? 1 : 2;
    watch(link, upward); /* level-triggered: stop watching the source that ended */
    shutdown(upward ? link->upstream : link->client, SHUT_WR);
}

/* Move pipe contents to the destination: 1 done, 0 it would block, -1 failed (link ended). */
static int flush(Link *link, Direction *d) {
    int upward = d == &link->up;
    int dst = upward ? link->upstream : link->client;
    while (d->pending) {
        ssize_t moved = splice(d->pipe_r, NULL, dst, NULL, d->pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (moved < 0) {
            if (errno == EAGAIN || errno == EINTR) return 0;
            fail(link, errno, !upward);
            return -1;
        }
        d->pending -= (size_t)moved;
    }
    return 1;
}

/* Take a pipe for `d`, or end the link: 0 taken, -1 ended. */
static int need_pipe(Link *link, Direction *d) {
    if (d->pipe_w >= 0 || pipe_take(link->engine, d) == 0) return 0;
    char reason[200];
    snprintf(reason, sizeof reason, "cannot make a pipe: %s", strerror(errno));
    for (char *c = reason; *c; c++) *c = (char)((*c >= 'A' && *c <= 'Z') ? *c + 32 : *c);
    end(link, reason);
    return -1;
}

/* The source ended (read 0): pass it on once the pipe is empty. */
static void source_ended(Link *link, Direction *d) {
    d->eof = 1;
    d->reading = 0;
    if (d->pending == 0) {
        release(link->engine, d);
        finish(link, d);
    } else {
        watch(link, d == &link->up);
    }
}

/* The destination would not take it all: the rest waits in the pipe (flush sends it), the
 * source is not read until it has gone. */
static void blocked(Link *link, Direction *d) {
    int upward = d == &link->up;
    d->reading = 0;
    d->blocked = 1;
    watch(link, upward);
    watch(link, !upward);
}

/* One copy step: 1 a full read (bulk: splice from now on), 0 done for this wake-up, -1 the
 * link ended or waits for its destination. */
static int copy_once(Link *link, Direction *d, int hangup) {
    char buffer[COPY_BYTES];
    int upward = d == &link->up;
    int src = upward ? link->client : link->upstream;
    int dst = upward ? link->upstream : link->client;
    ssize_t got = recv(src, buffer, sizeof buffer, MSG_DONTWAIT);
    if (got < 0) {
        if (errno == EAGAIN || errno == EINTR) return 0;
        fail(link, errno, upward);
        return -1;
    }
    if (got == 0) {
        source_ended(link, d);
        return -1;
    }
    if (upward)
        link->bytes_up += (unsigned long long)got;
    else
        link->bytes_down += (unsigned long long)got;
    ssize_t sent = send(dst, buffer, (size_t)got, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            fail(link, errno, !upward);
            return -1;
        }
        sent = 0;
    }
    if (sent < got) { /* the rest into an empty pipe (COPY_BYTES fits any): flush's to send */
        if (need_pipe(link, d) < 0) return -1;
        ssize_t kept = write(d->pipe_w, buffer + sent, (size_t)(got - sent));
        if (kept != got - sent) {
            char reason[200];
            snprintf(reason, sizeof reason, "internal error: cannot hold unsent bytes: %s",
                     kept < 0 ? strerror(errno) : "short write");
            end(link, reason);
            return -1;
        }
        d->pending = (size_t)kept;
        blocked(link, d);
        return -1;
    }
    if (got == COPY_BYTES) return 1;
    return hangup ? 2 : 0; /* a hang-up: read on, to its EOF */
}

static void on_readable(Link *link, Direction *d, int hangup) {
    Engine *engine = link->engine;
    int upward = d == &link->up;
    int src = upward ? link->client : link->upstream;
    for (int round = 0; !d->spliced && round < ROUNDS_PER_WAKEUP; round++) {
        int step = copy_once(link, d, hangup);
        if (step < 0) return;
        if (step == 0) return;
        if (step == 1) d->spliced = 1;
    }
    if (!d->spliced) return;
    if (need_pipe(link, d) < 0) return;
    for (int round = 0; round < ROUNDS_PER_WAKEUP; round++) {
        ssize_t moved = splice(src, NULL, d->pipe_w, NULL, engine->pipe_size, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (moved < 0) {
            if (errno == EAGAIN || errno == EINTR) break;
            fail(link, errno, upward);
            return;
        }
        if (moved == 0) {
            source_ended(link, d);
            return;
        }
        d->pending += (size_t)moved;
        if (upward)
            link->bytes_up += (unsigned long long)moved;
        else
            link->bytes_down += (unsigned long long)moved;
        int flushed = flush(link, d);
        if (flushed <= 0) {
            if (flushed == 0 && link->state != CLOSED) blocked(link, d);
            return;
        }
        if ((size_t)moved < engine->pipe_size && !hangup) break;
    }
    release(engine, d);
}

static void on_writable(Link *link, Direction *d) {
    int upward = d == &link->up;
    if (flush(link, d) <= 0) return;
    if (link->state == CLOSED) return;
    d->blocked = 0;
    watch(link, !upward); /* the destination */
    release(link->engine, d);
    if (d->eof) {
        finish(link, d);
    } else {
        d->reading = 1;
        watch(link, upward);
    }
}

static void ready(Link *link, int client_side, unsigned events) {
    Direction *source = client_side ? &link->up : &link->down;
    Direction *destination = client_side ? &link->down : &link->up;
    if ((events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) && source->reading)
        on_readable(link, source, events & EPOLLRDHUP);
    if ((events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && destination->blocked && link->state != CLOSED)
        on_writable(link, destination);
}

static void connect_failed(Link *link, int how, int code);

/* An IPv4 client of a dual-stack socket (::ffff:a.b.c.d) as the IPv4 address it is. */
static void plain(const struct sockaddr_storage *in, struct sockaddr_storage *out) {
    memcpy(out, in, sizeof *out);
    if (in->ss_family != AF_INET6) return;
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)in;
    if (!IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) return;
    struct sockaddr_in *in4 = (struct sockaddr_in *)out;
    uint16_t port = in6->sin6_port;
    unsigned char bytes[4];
    memcpy(bytes, &in6->sin6_addr.s6_addr[12], 4);
    memset(out, 0, sizeof *out);
    in4->sin_family = AF_INET;
    in4->sin_port = port;
    memcpy(&in4->sin_addr, bytes, 4);
}

/* An IPv4 address as the IPv4-mapped IPv6 one (a header names one family). */
static void mapped(struct sockaddr_storage *address) {
    if (address->ss_family != AF_INET) return;
    struct sockaddr_in in4;
    memcpy(&in4, address, sizeof in4);
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)address;
    memset(address, 0, sizeof *address);
    in6->sin6_family = AF_INET6;
    in6->sin6_port = in4.sin_port;
    in6->sin6_addr.s6_addr[10] = in6->sin6_addr.s6_addr[11] = 0xff;
    memcpy(&in6->sin6_addr.s6_addr[12], &in4.sin_addr, 4);
}

/* The PROXY header (proto/proxy.py's `header`, v1 or v2) for a client and the address it
 * reached; returns its length (at most 108 bytes for v1, 52 for v2). */
static size_t proxy_header(int version, const struct sockaddr_storage *source,
                           const struct sockaddr_storage *destination, unsigned char *out) {
    static const unsigned char signature[12] = {'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};
    struct sockaddr_storage client, server;
    plain(source, &client);
    plain(destination, &server);
    int known = (client.ss_family == AF_INET || client.ss_family == AF_INET6) &&
                (server.ss_family == AF_INET || server.ss_family == AF_INET6);
    if (!known) {
        if (version == 1) {
            memcpy(out, "PROXY UNKNOWN\r\n", 15);
            return 15;
        }
        memcpy(out, signature, 12);
        out[12] = 0x21;
        out[13] = 0x00;
        out[14] = out[15] = 0;
        return 16;
    }
    if (client.ss_family != server.ss_family) {
        mapped(&client);
        mapped(&server);
    }
    int four = client.ss_family == AF_INET;
    const void *client_address = four ? (const void *)&((struct sockaddr_in *)&client)->sin_addr
                                      : (const void *)&((struct sockaddr_in6 *)&client)->sin6_addr;
    const void *server_address = four ? (const void *)&((struct sockaddr_in *)&server)->sin_addr
                                      : (const void *)&((struct sockaddr_in6 *)&server)->sin6_addr;
    uint16_t client_port = four ? ((struct sockaddr_in *)&client)->sin_port : ((struct sockaddr_in6 *)&client)->sin6_port;
    uint16_t server_port = four ? ((struct sockaddr_in *)&server)->sin_port : ((struct sockaddr_in6 *)&server)->sin6_port;
    if (version == 1) {
        char from[INET6_ADDRSTRLEN], to[INET6_ADDRSTRLEN];
        inet_ntop(client.ss_family, client_address, from, sizeof from);
        inet_ntop(server.ss_family, server_address, to, sizeof to);
        int length = snprintf((char *)out, 108, "PROXY %s %s %s %u %u\r\n", four ? "TCP4" : "TCP6", from, to,
                              ntohs(client_port), ntohs(server_port));
        return length > 0 && length < 108 ? (size_t)length : 0;
    }
    size_t size = four ? 4 : 16;
    memcpy(out, signature, 12);
    out[12] = 0x21;
    out[13] = four ? 0x11 : 0x21;
    out[14] = 0;
    out[15] = (unsigned char)(2 * size + 4);
    memcpy(out + 16, client_address, size);
    memcpy(out + 16 + size, server_address, size);
    memcpy(out + 16 + 2 * size, &client_port, 2);
    memcpy(out + 18 + 2 * size, &server_port, 2);
    return 20 + 2 * size;
}

/* A PROXY header, with what the client sent while its upstream connected, in one send on the
 * just-connected upstream (relay/proxyout.py, D20); 0, or -1 when it did not all go out. */
static int send_proxy(Link *link) {
    unsigned char buffer[128 + FIRST_BYTES];
    if (link->local_len == 0) {
        socklen_t size = sizeof link->local;
        if (getsockname(link->client, (struct sockaddr *)&link->local, &size) < 0) link->local.ss_family = AF_UNSPEC;
    }
    size_t length = proxy_header(link->proxy, &link->peer, &link->local, buffer);
    if (length == 0) return -1;
    ssize_t first = recv(link->client, buffer + length, FIRST_BYTES, MSG_DONTWAIT);
    if (first > 0) {
        length += (size_t)first;
        link->bytes_up += (unsigned long long)first;
    }
    ssize_t sent = send(link->upstream, buffer, length, MSG_NOSIGNAL | MSG_DONTWAIT);
    return sent == (ssize_t)length ? 0 : -1;
}

/* The connect went through: TCP_NODELAY, then relay both ways and tell Python. */
static void relay(Link *link) {
    Engine *engine = link->engine;
    list_drop(link);
    if (link->target.ss_family != AF_UNIX) {
        int one = 1;
        setsockopt(link->upstream, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    if (link->proxy && send_proxy(link) < 0) {
        connect_failed(link, FAIL_PROXY, errno);
        return;
    }
    /* (An upstream that waited for its connect is watched for writing: watch() modifies that.) */
    link->state = RELAYING;
    link->up.reading = link->down.reading = 1;
    watch(link, 1);
    watch(link, 0);
    link->opened_ns = now_ns();
    if (link->keepalive) list_push(&engine->waiting, link);
    double seconds = (double)(link->opened_ns - link->began_ns) / 1e9;
    PyObject *event = Py_BuildValue("(iOOOd)", EV_OPEN, link->token, (PyObject *)link, link->client_text, seconds);
    if (emit(engine, event) < 0) PyErr_Clear();
    if (lines_of(engine)) line_opened(link);
}

/* The connect failed: the client is closed, Python told why. */
static void connect_failed(Link *link, int how, int code) {
    Engine *engine = link->engine;
    if (link->failover && (how == FAIL_CONNECT || how == FAIL_TIMEOUT)) {
        /* Python tells the pool and picks the next backend, or gives up (Link.fail). */
        list_drop(link);
        if (link->upstream >= 0) close(link->upstream);
        link->upstream = -1;
        link->upstream_mask = 0;
        link->state = WAITING;
        double elapsed = (double)(now_ns() - link->began_ns) / 1e9;
        PyObject *event =
            Py_BuildValue("(iOOiidd)", EV_RETRY, link->token, (PyObject *)link, how, code, elapsed, link->timeout);
        if (emit(engine, event) == 0) return;
        PyErr_Clear(); /* no event: no one would end it; it fails here */
    }
    PyObject *event = Py_BuildValue("(iOOiidiiO)", EV_FAILED, link->token, link->client_text, how, code,
                                    link->timeout, link->backend, link->counted, (PyObject *)link);
    link->state = CLOSED;
    list_drop(link);
    if (link->client >= 0) close(link->client);
    if (link->upstream >= 0) close(link->upstream);
    link->client = link->upstream = -1;
    link->upstream_mask = 0;
    engine->live--;
    if (emit(engine, event) < 0) PyErr_Clear();
    bury(engine, link);
}

/* Act on connect()'s answer. */
static void connected(Link *link, int code) {
    if (code == 0 || code == EISCONN) {
        relay(link);
    } else if (code == EINPROGRESS || code == EALREADY) {
        struct epoll_event event;
        event.events = EPOLLOUT;
        event.data.u64 = (uint64_t)(uintptr_t)link | TAG_UPSTREAM;
        epoll_ctl(link->engine->epoll, EPOLL_CTL_ADD, link->upstream, &event);
        link->upstream_mask = EPOLLOUT;
    } else {
        connect_failed(link, FAIL_CONNECT, code);
    }
}

static void on_connect_event(Link *link) {
    int code = 0;
    socklen_t size = sizeof code;
    if (getsockopt(link->upstream, SOL_SOCKET, SO_ERROR, &code, &size) < 0) code = errno;
    if (code) {
        connect_failed(link, FAIL_CONNECT, code);
        return;
    }
    relay(link);
}

/* ------------------------------------------------------------------ accepting */
/* An interface name that needs no escaping in a log line, text or JSON (Linux allows nearly
 * any byte in one): the others are written as their index. */
static int plain_name(const char *name) {
    for (const char *c = name; *c; c++) {
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '.' ||
              *c == '_' || *c == '-' || *c == '@'))
            return 0;
    }
    return 1;
}

static PyObject *peer_text(struct sockaddr_storage *peer) {
    char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    if (peer->ss_family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)peer;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        return PyUnicode_FromFormat("%s:%d", host, ntohs(in->sin_port));
    }
    if (peer->ss_family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)peer;
        int port = ntohs(in6->sin6_port);
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], host, sizeof host);
            return PyUnicode_FromFormat("%s:%d", host, port);
        }
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        if (in6->sin6_scope_id) {
            char name[IF_NAMESIZE];
            size_t used = strlen(host);
            if (if_indextoname(in6->sin6_scope_id, name) != NULL && plain_name(name))
                snprintf(host + used, sizeof host - used, "%%%s", name);
            else
                snprintf(host + used, sizeof host - used, "%%%u", in6->sin6_scope_id);
        }
        return PyUnicode_FromFormat("[%s]:%d", host, port);
    }
    return PyUnicode_FromString("unknown");
}

static void unwatch_listener(Engine *engine, Listener *listener) {
    if (!listener->watched) return;
    struct epoll_event event = {0};
    epoll_ctl(engine->epoll, EPOLL_CTL_DEL, listener->fd, &event);
    listener->watched = 0;
}

static int within(const Network *networks, Py_ssize_t count, int family, const unsigned char *address) {
    for (Py_ssize_t i = 0; i < count; i++) {
        const Network *network = &networks[i];
        if (network->family != family) continue;
        int whole = network->prefix / 8, rest = network->prefix % 8;
        if (memcmp(network->address, address, (size_t)whole) != 0) continue;
        if (rest && ((network->address[whole] ^ address[whole]) & (0xff << (8 - rest)) & 0xff)) continue;
        return 1;
    }
    return 0;
}

/* Whether a client may connect (acl.py's AccessPolicy.permits): deny wins, an empty allow list
 * admits everyone; an IPv4 client of a dual-stack listener is judged as IPv4. */
static int permitted(const Listener *listener, const struct sockaddr_storage *peer) {
    if (listener->allows == 0 && listener->denies == 0) return 1;
    int family;
    const unsigned char *address;
    if (peer->ss_family == AF_INET) {
        family = AF_INET;
        address = (const unsigned char *)&((const struct sockaddr_in *)peer)->sin_addr;
    } else if (peer->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)peer;
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            family = AF_INET;
            address = &in6->sin6_addr.s6_addr[12];
        } else {
            family = AF_INET6;
            address = in6->sin6_addr.s6_addr;
        }
    } else {
        return 0; /* lists, and an address that is not an IP: refused, as acl.py does */
    }
    if (within(listener->deny, listener->denies, family, address)) return 0;
    return listener->allows == 0 || within(listener->allow, listener->allows, family, address);
}

/* balance.py's choice among healthy primaries: smooth weighted round-robin (nginx's), or the
 * first one written. */
static int pick_here(Listener *listener) {
    if (listener->balance == BALANCE_FIRST) {
        for (Py_ssize_t i = 0; i < listener->ntargets; i++)
            if (listener->weights[i] > 0) return (int)i;
        return 0;
    }
    long total = 0;
    int best = -1;
    for (Py_ssize_t i = 0; i < listener->ntargets; i++) {
        if (listener->weights[i] <= 0) continue;
        listener->current[i] += listener->weights[i];
        total += listener->weights[i];
        if (best < 0 || listener->current[i] > listener->current[best]) best = (int)i;
    }
    if (best < 0) return 0;
    listener->current[best] -= total;
    return best;
}

static int healthy(Listener *listener) {
    return listener->balance != BALANCE_PYTHON && listener->healthy != NULL &&
           PyByteArray_GET_SIZE(listener->healthy) > 0 && PyByteArray_AS_STRING(listener->healthy)[0] != 0;
}

static void refuse(int client) {
    struct linger reset = {1, 0};
    setsockopt(client, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
    close(client);
}

static void on_accept(Engine *engine, Listener *listener) {
    Link *burst[ACCEPT_BATCH];
    int begun = 0, refused = 0;
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        struct sockaddr_storage peer;
        socklen_t size = sizeof peer;
        int client = accept4(listener->fd, (struct sockaddr *)&peer, &size, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (client < 0) {
            int code = errno;
            if (code == EAGAIN) break;
            if (code == ECONNABORTED || code == EPROTO || code == EPERM || code == EINTR) continue;
            if (code == EMFILE || code == ENFILE || code == ENOBUFS || code == ENOMEM) {
                unwatch_listener(engine, listener);
                if (emit(engine, Py_BuildValue("(iOi)", EV_EXHAUSTED, listener->token, code)) < 0) PyErr_Clear();
            } else if (emit(engine, Py_BuildValue("(iOi)", EV_ACCEPT_FAILED, listener->token, code)) < 0) {
                PyErr_Clear();
            }
            break;
        }
        if (listener->refusing) {
            refuse(client);
            refused++;
            continue;
        }
        PyObject *text = peer_text(&peer);
        if (text == NULL) {
            PyErr_Clear();
            close(client);
            continue;
        }
        if (!permitted(listener, &peer)) {
            close(client);
            if (emit(engine, Py_BuildValue("(iON)", EV_DENIED, listener->token, text)) < 0) PyErr_Clear();
            continue;
        }
        Link *link = link_new(engine, listener->token, PyTuple_GET_ITEM(listener->texts, 0), client, text);
        Py_DECREF(text);
        if (link == NULL) {
            PyErr_Clear();
            close(client);
            continue;
        }
        link->keepalive = listener->keepalive;
        link->timeout = listener->timeout;
        double seconds = listener->timeout;
        if (listener->picker != NULL && healthy(listener)) { /* several backends, all well */
            link->backend = pick_here(listener);
            link->failover = 1;
            seconds = listener->attempt;
            Py_SETREF(link->texts, Py_NewRef(PyTuple_GET_ITEM(listener->texts, link->backend)));
        } else if (listener->picker != NULL) { /* the rule's pool picks (Python) */
            PyObject *picked = PyObject_CallOneArg(listener->picker, text);
            int index = -1;
            if (picked == NULL || !PyArg_ParseTuple(picked, "id", &index, &seconds) || index < 0 ||
                index >= listener->ntargets) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "picker gave no backend");
                PyErr_WriteUnraisable(listener->picker);
                Py_XDECREF(picked);
                link->state = CLOSED;
                close(client);
                link->client = -1;
                engine->live--;
                bury(engine, link);
                continue;
            }
            Py_DECREF(picked);
            link->backend = index;
            link->failover = 1;
            link->counted = 1;
            Py_SETREF(link->texts, Py_NewRef(PyTuple_GET_ITEM(listener->texts, index)));
        }
        link->timeout = seconds;
        link->deadline_ns = link->began_ns + (int64_t)(seconds * 1e9);
        Target *target = &listener->targets[link->backend];
        memcpy(&link->target, &target->address, target->length);
        link->target_len = target->length;
        link->proxy = listener->proxy;
        if (link->proxy) {
            memcpy(&link->peer, &peer, sizeof peer);
            memcpy(&link->local, &listener->local, sizeof listener->local);
            link->local_len = listener->local_len;
        }
        int upstream = socket(link->target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (upstream < 0) {
            connect_failed(link, FAIL_SOCKET, errno);
            continue;
        }
        link->upstream = upstream;
        if (connect(upstream, (struct sockaddr *)&link->target, link->target_len) < 0 && errno != EINPROGRESS) {
            connect_failed(link, FAIL_CONNECT, errno);
            continue;
        }
        list_push(&engine->connecting, link);
        burst[begun++] = link;
    }
    if (refused && emit(engine, Py_BuildValue("(iOi)", EV_REFUSED, listener->token, refused)) < 0) PyErr_Clear();
    /* Every connect of the burst began before any is asked how it went (forwarder.py, D2). */
    for (int i = 0; i < begun; i++) {
        Link *link = burst[i];
        int code = 0;
        if (connect(link->upstream, (struct sockaddr *)&link->target, link->target_len) < 0) code = errno;
        connected(link, code);
    }
    arm(engine);
}

/* ------------------------------------------------------------------ the timer */
static void keepalive_on(Engine *engine, int fd) {
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &engine->ka_idle, sizeof engine->ka_idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &engine->ka_interval, sizeof engine->ka_interval);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &engine->ka_count, sizeof engine->ka_count);
}

static void on_tick(Engine *engine) {
    uint64_t expirations;
    if (read(engine->timer, &expirations, sizeof expirations) < 0) { /* EAGAIN: nothing */
    }
    int64_t now = now_ns();
    Link *link = engine->connecting.next;
    while (link != &engine->connecting) {
        Link *following = link->next;
        if (link->deadline_ns <= now) connect_failed(link, FAIL_TIMEOUT, ETIMEDOUT);
        link = following;
    }
    while (engine->waiting.next != &engine->waiting) {
        link = engine->waiting.next;
        if (link->opened_ns + KEEPALIVE_AFTER_NS > now) break;
        list_drop(link);
        keepalive_on(engine, link->upstream);
    }
    arm(engine);
}

/* ------------------------------------------------------------------ Engine methods */
static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"pipe_size", "keepalive", NULL};
    Py_ssize_t pipe_size = 1 << 20;
    int idle = 60, interval = 10, count = 6;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|n(iii)", names, &pipe_size, &idle, &interval, &count))
        return NULL;
    if (pipe_size < 4096) {
        PyErr_SetString(PyExc_ValueError, "pipe_size must be at least 4096");
        return NULL;
    }
    Engine *engine = (Engine *)type->tp_alloc(type, 0);
    if (engine == NULL) return NULL;
    engine->epoll = -1;
    engine->timer = -1;
    list_init(&engine->connecting);
    list_init(&engine->waiting);
    engine->pipe_size = (size_t)pipe_size;
    engine->ka_idle = idle;
    engine->ka_interval = interval;
    engine->ka_count = count;
    engine->epoll = epoll_create1(EPOLL_CLOEXEC);
    engine->timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (engine->epoll < 0 || engine->timer < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(engine);
        return NULL;
    }
    struct epoll_event event;
    event.events = EPOLLIN;
    event.data.u64 = TAG_TIMER;
    if (epoll_ctl(engine->epoll, EPOLL_CTL_ADD, engine->timer, &event) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(engine);
        return NULL;
    }
    return (PyObject *)engine;
}

static Listener *find_listener(Engine *engine, int fd) {
    for (Listener *listener = engine->listeners; listener != NULL; listener = listener->next)
        if (listener->fd == fd) return listener;
    return NULL;
}

static int parse_target(PyObject *target, struct sockaddr_storage *out, socklen_t *size) {
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope = 0;
    if (!PyArg_ParseTuple(target, "si|II", &host, &port, &flowinfo, &scope)) return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return -1;
    }
    memset(out, 0, sizeof *out);
    struct sockaddr_in *in = (struct sockaddr_in *)out;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, host, &in->sin_addr) == 1) {
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)port);
        *size = sizeof *in;
        return 0;
    }
    char bare[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    snprintf(bare, sizeof bare, "%s", host);
    char *percent = strchr(bare, '%');
    if (percent != NULL) {
        *percent = '\0';
        if (!scope) scope = if_nametoindex(percent + 1);
    }
    if (inet_pton(AF_INET6, bare, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        in6->sin6_flowinfo = htonl(flowinfo);
        in6->sin6_scope_id = scope;
        *size = sizeof *in6;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "not an IP address: %s", host);
    return -1;
}

/* (mode, weights, healthy bytearray, attempt seconds): how the engine may pick by itself. */
static int parse_balance(Listener *listener, PyObject *balance) {
    int mode;
    PyObject *weights, *flag;
    double attempt;
    if (!PyArg_ParseTuple(balance, "iOO!d", &mode, &weights, &PyByteArray_Type, &flag, &attempt)) return -1;
    PyObject *items = PySequence_Fast(weights, "weights must be a sequence");
    if (items == NULL) return -1;
    if (PySequence_Fast_GET_SIZE(items) != listener->ntargets || mode < BALANCE_PYTHON || mode > BALANCE_FIRST) {
        Py_DECREF(items);
        PyErr_SetString(PyExc_ValueError, "balance: one weight a target, mode 0, 1 or 2");
        return -1;
    }
    listener->weights = PyMem_Calloc((size_t)listener->ntargets, sizeof(int));
    listener->current = PyMem_Calloc((size_t)listener->ntargets, sizeof(long));
    if (listener->weights == NULL || listener->current == NULL) {
        Py_DECREF(items);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < listener->ntargets; i++) {
        long weight = PyLong_AsLong(PySequence_Fast_GET_ITEM(items, i));
        if (weight == -1 && PyErr_Occurred()) {
            Py_DECREF(items);
            return -1;
        }
        listener->weights[i] = weight < 0 ? 0 : (int)(weight > 1000000 ? 1000000 : weight);
    }
    Py_DECREF(items);
    listener->balance = mode;
    Py_INCREF(flag);
    listener->healthy = flag;
    listener->attempt = attempt;
    return 0;
}

/* One target's texts for the log lines: (label, label in JSON, target, target in JSON). */
static int check_texts(PyObject *texts) {
    if (!PyTuple_Check(texts) || PyTuple_GET_SIZE(texts) != 4) {
        PyErr_SetString(PyExc_ValueError, "texts must be (label, label in JSON, target, target in JSON) a target");
        return -1;
    }
    for (Py_ssize_t i = 0; i < 4; i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(texts, i))) {
            PyErr_SetString(PyExc_TypeError, "texts must be strings");
            return -1;
        }
    }
    return 0;
}

/* A list of (packed address, prefix length) as Networks in a new PyMem array. */
static int parse_networks(PyObject *list, Network **out, Py_ssize_t *count) {
    PyObject *items = PySequence_Fast(list, "allow and deny must be sequences");
    if (items == NULL) return -1;
    Py_ssize_t size = PySequence_Fast_GET_SIZE(items);
    *out = NULL;
    *count = 0;
    if (size == 0) {
        Py_DECREF(items);
        return 0;
    }
    Network *networks = PyMem_Calloc((size_t)size, sizeof *networks);
    if (networks == NULL) {
        Py_DECREF(items);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        const char *packed;
        Py_ssize_t length;
        int prefix;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, i), "y#i", &packed, &length, &prefix)) goto fail;
        if ((length != 4 && length != 16) || prefix < 0 || prefix > length * 8) {
            PyErr_SetString(PyExc_ValueError, "a network is (4 or 16 packed bytes, a prefix length that fits)");
            goto fail;
        }
        networks[i].family = length == 4 ? AF_INET : AF_INET6;
        networks[i].prefix = prefix;
        memcpy(networks[i].address, packed, (size_t)length);
    }
    Py_DECREF(items);
    *out = networks;
    *count = size;
    return 0;
fail:
    Py_DECREF(items);
    PyMem_Free(networks);
    return -1;
}

static void free_listener(Listener *listener) {
    Py_XDECREF(listener->picker);
    Py_XDECREF(listener->healthy);
    PyMem_Free(listener->weights);
    PyMem_Free(listener->current);
    PyMem_Free(listener->targets);
    Py_XDECREF(listener->token);
    Py_XDECREF(listener->texts);
    PyMem_Free(listener->allow);
    PyMem_Free(listener->deny);
    PyMem_Free(listener);
}

static int watch_listener(Engine *engine, Listener *listener) {
    if (listener->watched) return 0;
    struct epoll_event event;
    event.events = EPOLLIN;
    event.data.u64 = (uint64_t)(uintptr_t)listener | TAG_LISTENER;
    if (epoll_ctl(engine->epoll, EPOLL_CTL_ADD, listener->fd, &event) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    listener->watched = 1;
    return 0;
}

PyDoc_STRVAR(listen_doc,
             "listen(fd, token, targets, timeout, keepalive, texts, allow=(), deny=(), picker=None, proxy=0, "
             "local=None)\n--\n\n"
             "Serve listening socket `fd` (non-blocking): each client is connected to one of `targets`\n"
             "((host, port) with an IP literal, each) within `timeout` seconds and relayed; events carry\n"
             "`token`. `texts` has one (label, label in JSON, target, target in JSON) a target for the log\n"
             "lines the engine writes. `allow` and `deny` are (packed address, prefix length) pairs\n"
             "(acl.py's rules). With several targets `picker(client)` gives (index, seconds) for each\n"
             "client, and a failed connect is an EV_RETRY event. `proxy` 1 or 2 sends a PROXY header first,\n"
             "naming `local` ((host, port)) as the address reached, or the client socket's own when None.\n"
             "`balance` (mode, weights, healthy, attempt) lets the engine pick by itself while healthy[0].\n"
             "Watching begins at once (`watch` stops it).");

static PyObject *Engine_listen(Engine *engine, PyObject *args) {
    int fd, keepalive, proxy = 0;
    PyObject *token, *targets, *texts, *allow = NULL, *deny = NULL, *picker = Py_None, *local = Py_None;
    PyObject *balance = Py_None;
    double timeout;
    if (!PyArg_ParseTuple(args, "iOOdpO!|OOOiOO", &fd, &token, &targets, &timeout, &keepalive, &PyTuple_Type,
                          &texts, &allow, &deny, &picker, &proxy, &local, &balance))
        return NULL;
    if (proxy < 0 || proxy > 2) {
        PyErr_SetString(PyExc_ValueError, "proxy must be 0, 1 or 2");
        return NULL;
    }
    for (Py_ssize_t t = 0; t < PyTuple_GET_SIZE(texts); t++) {
        if (check_texts(PyTuple_GET_ITEM(texts, t)) < 0) return NULL;
    }
    if (find_listener(engine, fd) != NULL) {
        PyErr_Format(PyExc_ValueError, "descriptor %d is served already", fd);
        return NULL;
    }
    Listener *listener = PyMem_Calloc(1, sizeof *listener);
    if (listener == NULL) return PyErr_NoMemory();
    PyObject *items = PySequence_Fast(targets, "targets must be a sequence of (host, port)");
    if (items == NULL) {
        free_listener(listener);
        return NULL;
    }
    listener->ntargets = PySequence_Fast_GET_SIZE(items);
    listener->targets = listener->ntargets ? PyMem_Calloc((size_t)listener->ntargets, sizeof(Target)) : NULL;
    int bad = listener->targets == NULL;
    if (bad && listener->ntargets) PyErr_NoMemory();
    if (bad && !listener->ntargets) PyErr_SetString(PyExc_ValueError, "no target");
    for (Py_ssize_t i = 0; !bad && i < listener->ntargets; i++)
        bad = parse_target(PySequence_Fast_GET_ITEM(items, i), &listener->targets[i].address,
                           &listener->targets[i].length) < 0;
    Py_DECREF(items);
    if (!bad && PyTuple_GET_SIZE(texts) != listener->ntargets) {
        PyErr_SetString(PyExc_ValueError, "texts must have one entry a target");
        bad = 1;
    }
    if (!bad && picker != Py_None) {
        Py_INCREF(picker);
        listener->picker = picker;
    }
    if (!bad && balance != Py_None) bad = parse_balance(listener, balance) < 0;
    listener->proxy = proxy;
    if (!bad && local != Py_None) bad = parse_target(local, &listener->local, &listener->local_len) < 0;
    if (bad || (allow != NULL && parse_networks(allow, &listener->allow, &listener->allows) < 0) ||
        (deny != NULL && parse_networks(deny, &listener->deny, &listener->denies) < 0)) {
        free_listener(listener);
        return NULL;
    }
    listener->fd = fd;
    listener->timeout = timeout;
    listener->keepalive = keepalive;
    Py_INCREF(token);
    listener->token = token;
    Py_INCREF(texts);
    listener->texts = texts;
    if (watch_listener(engine, listener) < 0) {
        free_listener(listener);
        return NULL;
    }
    listener->next = engine->listeners;
    engine->listeners = listener;
    Py_RETURN_NONE;
}

static Listener *listener_arg(Engine *engine, PyObject *args, int *flag) {
    int fd;
    if (flag != NULL ? !PyArg_ParseTuple(args, "ip", &fd, flag) : !PyArg_ParseTuple(args, "i", &fd)) return NULL;
    Listener *listener = find_listener(engine, fd);
    if (listener == NULL) PyErr_Format(PyExc_KeyError, "descriptor %d is not served", fd);
    return listener;
}

static PyObject *Engine_watch(Engine *engine, PyObject *args) {
    int on;
    Listener *listener = listener_arg(engine, args, &on);
    if (listener == NULL) return NULL;
    if (on) {
        if (watch_listener(engine, listener) < 0) return NULL;
    } else {
        unwatch_listener(engine, listener);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_refuse(Engine *engine, PyObject *args) {
    int on;
    Listener *listener = listener_arg(engine, args, &on);
    if (listener == NULL) return NULL;
    listener->refusing = on;
    Py_RETURN_NONE;
}

static PyObject *Engine_unlisten(Engine *engine, PyObject *args) {
    int fd;
    if (!not_running(engine)) return NULL;
    if (!PyArg_ParseTuple(args, "i", &fd)) return NULL;
    for (Listener **at = &engine->listeners; *at != NULL; at = &(*at)->next) {
        Listener *listener = *at;
        if (listener->fd != fd) continue;
        unwatch_listener(engine, listener);
        *at = listener->next;
        free_listener(listener);
        Py_RETURN_NONE;
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_abandon(Engine *engine, PyObject *token) {
    /* Close the clients of `token` still waiting for their upstream (shutdown): no events. */
    if (!not_running(engine)) return NULL;
    long count = 0;
    Link *link = engine->connecting.next;
    while (link != &engine->connecting) {
        Link *following = link->next;
        if (link->token == token) {
            link->state = CLOSED;
            list_drop(link);
            close(link->client);
            if (link->upstream >= 0) close(link->upstream);
            link->client = link->upstream = -1;
            engine->live--;
            Py_DECREF(link);
            count++;
        }
        link = following;
    }
    arm(engine);
    return PyLong_FromLong(count);
}

PyDoc_STRVAR(run_doc, "run(lines=None)\n--\n\n"
                      "Handle what is ready now, without waiting. With `lines` 1 (text) or 2 (JSON) the engine\n"
                      "writes the sessions' open and closed lines (the last event is (LINES, [line, ...])); 0\n"
                      "leaves them to Python; None asks `mode()` when a line is due. The events since the last\n"
                      "call (tuples, see relay/native.py) go to `dispatch(events, lines)` when it is set, and\n"
                      "are returned otherwise (None: no event).");

static PyObject *Engine_run(Engine *engine, PyObject *const *args, Py_ssize_t nargs) {
    struct epoll_event ready_events[EVENTS_PER_RUN];
    if (!not_running(engine)) return NULL;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "run() takes at most one argument");
        return NULL;
    }
    engine->lines = LINES_PYTHON;
    engine->lines_known = 0;
    if (nargs == 1 && args[0] != Py_None) {
        long lines = PyLong_AsLong(args[0]);
        if (lines == -1 && PyErr_Occurred()) return NULL;
        if (lines < LINES_PYTHON || lines > LINES_JSON) {
            PyErr_SetString(PyExc_ValueError, "lines must be 0, 1 or 2");
            return NULL;
        }
        engine->lines = (int)lines;
        engine->lines_known = 1;
    }
    int count = epoll_wait(engine->epoll, ready_events, EVENTS_PER_RUN, 0);
    if (count < 0 && errno != EINTR) return PyErr_SetFromErrno(PyExc_OSError);
    engine->running = 1;
    /* A link closed by an earlier event of this batch stays allocated until the batch is
     * done: its CLOSED event holds it. */
    for (int i = 0; i < count; i++) {
        uint64_t data = ready_events[i].data.u64;
        unsigned tag = (unsigned)(data & TAG_MASK);
        void *pointer = (void *)(uintptr_t)(data & ~(uint64_t)TAG_MASK);
        unsigned events = ready_events[i].events;
        if (tag == TAG_LISTENER) {
            on_accept(engine, (Listener *)pointer);
        } else if (tag == TAG_TIMER) {
            on_tick(engine);
        } else {
            Link *link = (Link *)pointer;
            if (link->state == CLOSED) continue;
            if (link->state == CONNECTING) {
                if (tag == TAG_UPSTREAM) on_connect_event(link);
                continue;
            }
            ready(link, tag == TAG_CLIENT, events);
        }
    }
    engine->running = 0;
    unbury(engine);
    int lines = engine->lines_known ? engine->lines : LINES_PYTHON;
    engine->lines = LINES_PYTHON; /* a Link.close() from Python between runs: Python logs it */
    engine->lines_known = 1;
    if (engine->written != NULL) {
        PyObject *written = engine->written;
        engine->written = NULL;
        if (emit(engine, Py_BuildValue("(iN)", EV_LINES, written)) < 0) PyErr_Clear();
    }
    PyObject *events = engine->events;
    engine->events = NULL;
    if (events == NULL) Py_RETURN_NONE;
    if (engine->dispatch == NULL) return events;
    PyObject *mode = PyLong_FromLong(lines);
    PyObject *result = mode != NULL ? PyObject_CallFunctionObjArgs(engine->dispatch, events, mode, NULL) : NULL;
    Py_XDECREF(mode);
    Py_DECREF(events);
    if (result == NULL) return NULL; /* the loop reports it; the engine goes on */
    Py_DECREF(result);
    Py_RETURN_NONE;
}

static PyObject *Engine_fileno(Engine *engine, PyObject *Py_UNUSED(ignored)) { return PyLong_FromLong(engine->epoll); }

static PyObject *Engine_close(Engine *engine, PyObject *Py_UNUSED(ignored)) {
    /* Release what the engine holds (the live links were closed by their sessions first). */
    if (!not_running(engine)) return NULL;
    while (engine->listeners != NULL) {
        Listener *listener = engine->listeners;
        engine->listeners = listener->next;
        free_listener(listener);
    }
    Link *link = engine->connecting.next;
    while (link != &engine->connecting) { /* every pending one, whatever its token */
        Link *following = link->next;
        link->state = CLOSED;
        list_drop(link);
        close(link->client);
        if (link->upstream >= 0) close(link->upstream);
        link->client = link->upstream = -1;
        engine->live--;
        Py_DECREF(link);
        link = following;
    }
    while (engine->pooled) {
        engine->pooled--;
        close(engine->pool[engine->pooled][0]);
        close(engine->pool[engine->pooled][1]);
    }
    if (engine->timer >= 0) close(engine->timer);
    if (engine->epoll >= 0) close(engine->epoll);
    engine->timer = engine->epoll = -1;
    Py_RETURN_NONE;
}

static void Engine_dealloc(Engine *engine) {
    PyObject *result = Engine_close(engine, NULL);
    Py_XDECREF(result);
    Py_XDECREF(engine->events);
    Py_XDECREF(engine->written);
    Py_XDECREF(engine->closed);
    Py_XDECREF(engine->mode);
    Py_XDECREF(engine->dispatch);
    Py_TYPE(engine)->tp_free((PyObject *)engine);
}

static PyObject *get_callable(PyObject *value) {
    if (value == NULL) Py_RETURN_NONE;
    Py_INCREF(value);
    return value;
}

static int set_callable(PyObject **slot, PyObject *value) {
    if (value == Py_None) value = NULL;
    if (value != NULL && !PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "must be callable or None");
        return -1;
    }
    Py_XINCREF(value);
    Py_XSETREF(*slot, value);
    return 0;
}

static PyObject *Engine_get_mode(Engine *engine, void *Py_UNUSED(c)) { return get_callable(engine->mode); }
static int Engine_set_mode(Engine *engine, PyObject *value, void *Py_UNUSED(c)) {
    return set_callable(&engine->mode, value);
}
static PyObject *Engine_get_dispatch(Engine *engine, void *Py_UNUSED(c)) { return get_callable(engine->dispatch); }
static int Engine_set_dispatch(Engine *engine, PyObject *value, void *Py_UNUSED(c)) {
    return set_callable(&engine->dispatch, value);
}

static PyObject *Engine_get_closed(Engine *engine, void *Py_UNUSED(closure)) {
    if (engine->closed == NULL) Py_RETURN_NONE;
    Py_INCREF(engine->closed);
    return engine->closed;
}

static int Engine_set_closed(Engine *engine, PyObject *value, void *Py_UNUSED(closure)) {
    Py_XINCREF(value);
    Py_XSETREF(engine->closed, value);
    return 0;
}

static PyObject *Engine_get_live(Engine *engine, void *Py_UNUSED(closure)) { return PyLong_FromLong(engine->live); }

static PyObject *Engine_get_pooled(Engine *engine, void *Py_UNUSED(closure)) { return PyLong_FromLong(engine->pooled); }

static PyMethodDef Engine_methods[] = {
    {"listen", (PyCFunction)Engine_listen, METH_VARARGS, listen_doc},
    {"watch", (PyCFunction)Engine_watch, METH_VARARGS, "watch(fd, on): accept from `fd` or stop (its clients wait)."},
    {"refuse", (PyCFunction)Engine_refuse, METH_VARARGS, "refuse(fd, on): reset new clients of `fd` (draining)."},
    {"unlisten", (PyCFunction)Engine_unlisten, METH_VARARGS, "unlisten(fd): forget `fd` (the caller closes it)."},
    {"abandon", (PyCFunction)Engine_abandon, METH_O, "abandon(token): close `token`'s clients still connecting."},
    {"run", (PyCFunction)(void (*)(void))Engine_run, METH_FASTCALL, run_doc},
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll descriptor to watch for readiness."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Close the epoll set, the timer and the pooled pipes."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"closed", (getter)Engine_get_closed, (setter)Engine_set_closed, "callable(link, reason) for Link.close", NULL},
    {"mode", (getter)Engine_get_mode, (setter)Engine_set_mode, "callable() -> who writes the lines (run)", NULL},
    {"dispatch", (getter)Engine_get_dispatch, (setter)Engine_set_dispatch, "callable(events, lines) (run)", NULL},
    {"live", (getter)Engine_get_live, NULL, "links connecting or relaying", NULL},
    {"pooled", (getter)Engine_get_pooled, NULL, "empty pipes kept for reuse", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "portfwd.relay._native.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(pipe_size=1048576, keepalive=(60, 10, 6)): accepts, connects and relays.",
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
    .tp_new = Engine_new,
};

/* ------------------------------------------------------------------ Link */
static PyObject *Link_close(Link *link, PyObject *reason) {
    if (!PyUnicode_Check(reason)) {
        PyErr_SetString(PyExc_TypeError, "reason must be a str");
        return NULL;
    }
    if (link->state != RELAYING) Py_RETURN_NONE;
    Engine *engine = link->engine;
    if (!not_running(engine)) return NULL;
    shut(link);
    PyObject *result = NULL;
    if (engine->closed != NULL) {
        result = PyObject_CallFunctionObjArgs(engine->closed, (PyObject *)link, reason, NULL);
    } else {
        Py_INCREF(Py_None);
        result = Py_None;
    }
    Py_DECREF(link); /* the engine's reference (the caller holds one) */
    return result;
}

static PyObject *Link_connect(Link *link, PyObject *args) {
    /* Try backend `index` at `target` within `seconds` (after EV_RETRY); 0, or the errno of a
     * connect that failed at once (the link waits on for another try or Link.fail). */
    int index;
    PyObject *target, *texts;
    double seconds;
    if (!PyArg_ParseTuple(args, "iOdO", &index, &target, &seconds, &texts)) return NULL;
    if (link->state != WAITING) {
        PyErr_SetString(PyExc_ValueError, "the link is not waiting for a backend");
        return NULL;
    }
    if (check_texts(texts) < 0 || parse_target(target, &link->target, &link->target_len) < 0) return NULL;
    link->backend = index;
    link->counted = 1;
    Py_SETREF(link->texts, Py_NewRef(texts));
    int upstream = socket(link->target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (upstream < 0) return PyLong_FromLong(-errno); /* this host's descriptors, not the backend */
    if (connect(upstream, (struct sockaddr *)&link->target, link->target_len) < 0 && errno != EINPROGRESS) {
        int code = errno;
        close(upstream);
        return PyLong_FromLong(code);
    }
    Engine *engine = link->engine;
    link->upstream = upstream;
    link->state = CONNECTING;
    link->timeout = seconds;
    link->deadline_ns = now_ns() + (int64_t)(seconds * 1e9);
    struct epoll_event event;
    event.events = EPOLLOUT;
    event.data.u64 = (uint64_t)(uintptr_t)link | TAG_UPSTREAM;
    epoll_ctl(engine->epoll, EPOLL_CTL_ADD, upstream, &event);
    link->upstream_mask = EPOLLOUT;
    list_push(&engine->connecting, link);
    arm(engine);
    return PyLong_FromLong(0);
}

static PyObject *Link_fail(Link *link, PyObject *Py_UNUSED(ignored)) {
    /* Give up on a waiting link: its client is closed (Python logs why). */
    if (link->state != WAITING) Py_RETURN_NONE;
    if (!not_running(link->engine)) return NULL;
    link->state = CLOSED;
    close(link->client);
    link->client = -1;
    link->engine->live--;
    Py_DECREF(link); /* the engine's reference (the caller holds one) */
    Py_RETURN_NONE;
}

static void Link_dealloc(Link *link) {
    if (link->state != CLOSED) { /* never: the engine holds every open link */
        if (link->client >= 0) close(link->client);
        if (link->upstream >= 0) close(link->upstream);
    }
    Py_XDECREF(link->session);
    Py_XDECREF(link->token);
    Py_XDECREF(link->client_text);
    Py_XDECREF(link->texts);
    Py_XDECREF(link->engine);
    PyObject_Free(link);
}

static PyObject *Link_get_up(Link *link, void *Py_UNUSED(c)) { return PyLong_FromUnsignedLongLong(link->bytes_up); }
static PyObject *Link_get_down(Link *link, void *Py_UNUSED(c)) { return PyLong_FromUnsignedLongLong(link->bytes_down); }
static PyObject *Link_get_upstream(Link *link, void *Py_UNUSED(c)) { return PyLong_FromLong(link->upstream); }
static PyObject *Link_get_client(Link *link, void *Py_UNUSED(c)) { return PyLong_FromLong(link->client); }
static PyObject *Link_get_closed(Link *link, void *Py_UNUSED(c)) { return PyBool_FromLong(link->state != RELAYING); }
static PyObject *Link_get_backend(Link *link, void *Py_UNUSED(c)) { return PyLong_FromLong(link->backend); }
static PyObject *Link_get_counted(Link *link, void *Py_UNUSED(c)) { return PyBool_FromLong(link->counted); }
static PyObject *Link_get_client_text(Link *link, void *Py_UNUSED(c)) {
    Py_INCREF(link->client_text);
    return link->client_text;
}
static PyObject *Link_get_token(Link *link, void *Py_UNUSED(c)) {
    Py_INCREF(link->token);
    return link->token;
}
static PyObject *Link_get_session(Link *link, void *Py_UNUSED(c)) {
    if (link->session == NULL) Py_RETURN_NONE;
    Py_INCREF(link->session);
    return link->session;
}
static int Link_set_session(Link *link, PyObject *value, void *Py_UNUSED(c)) {
    Py_XINCREF(value);
    Py_XSETREF(link->session, value);
    return 0;
}

static PyMethodDef Link_methods[] = {
    {"close", (PyCFunction)Link_close, METH_O, "close(reason): end the session now; the engine's `closed` is told."},
    {"connect", (PyCFunction)Link_connect, METH_VARARGS, "connect(index, target, seconds, texts): try another backend."},
    {"fail", (PyCFunction)Link_fail, METH_NOARGS, "fail(): give up on a waiting link; its client is closed."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Link_getset[] = {
    {"up", (getter)Link_get_up, NULL, "bytes client to target", NULL},
    {"down", (getter)Link_get_down, NULL, "bytes target to client", NULL},
    {"upstream", (getter)Link_get_upstream, NULL, "the upstream descriptor (-1 once closed)", NULL},
    {"client", (getter)Link_get_client, NULL, "the client descriptor", NULL},
    {"closed", (getter)Link_get_closed, NULL, "whether it has ended", NULL},
    {"backend", (getter)Link_get_backend, NULL, "which target of its listener it reached or tries", NULL},
    {"counted", (getter)Link_get_counted, NULL, "whether its backend's `active` was counted at the pick", NULL},
    {"client_text", (getter)Link_get_client_text, NULL, "the client's address as text", NULL},
    {"token", (getter)Link_get_token, NULL, "what its listener was given", NULL},
    {"session", (getter)Link_get_session, (setter)Link_set_session, "the session Python recorded", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LinkType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "portfwd.relay._native.Link",
    .tp_basicsize = sizeof(Link),
    .tp_dealloc = (destructor)Link_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One relayed connection (made by the engine).",
    .tp_methods = Link_methods,
    .tp_getset = Link_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "portfwd.relay._native", "The splice path's accept, connect and relay, in C.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    tzset(); /* the log lines' local time, as Python's time.localtime() has it */
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&LinkType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) return NULL;
    Py_INCREF(&LinkType);
    if (PyModule_AddObject(m, "Link", (PyObject *)&LinkType) < 0) return NULL;
    PyModule_AddIntConstant(m, "OPEN", EV_OPEN);
    PyModule_AddIntConstant(m, "FAILED", EV_FAILED);
    PyModule_AddIntConstant(m, "EXHAUSTED", EV_EXHAUSTED);
    PyModule_AddIntConstant(m, "REFUSED", EV_REFUSED);
    PyModule_AddIntConstant(m, "ACCEPT_FAILED", EV_ACCEPT_FAILED);
    PyModule_AddIntConstant(m, "CLOSED", EV_CLOSED);
    PyModule_AddIntConstant(m, "LINES", EV_LINES);
    PyModule_AddIntConstant(m, "DENIED", EV_DENIED);
    PyModule_AddIntConstant(m, "RETRY", EV_RETRY);
    PyModule_AddIntConstant(m, "FAIL_PROXY", FAIL_PROXY);
    PyModule_AddIntConstant(m, "LINES_TEXT", LINES_TEXT);
    PyModule_AddIntConstant(m, "LINES_JSON", LINES_JSON);
    PyModule_AddIntConstant(m, "FAIL_CONNECT", FAIL_CONNECT);
    PyModule_AddIntConstant(m, "FAIL_SOCKET", FAIL_SOCKET);
    PyModule_AddIntConstant(m, "FAIL_TIMEOUT", FAIL_TIMEOUT);
    return m;
}
