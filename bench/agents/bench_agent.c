/* bench_agent: the protocol agent bench/sessions.py runs inside a Corral sandbox.
 *
 * Speaks docs/agent-protocol.md v1 on CORRAL_EVENTS_FD (3) and CORRAL_CONTROL_FD (4);
 * libc only, so it builds static with `gcc -O2 -static` and needs nothing in the sandbox.
 *
 *   bench_agent blast TOKENS [PIPE_BYTES]
 *       Emits TOKENS 4-byte TOKEN frames ("tok ") as fast as it can: one 1 MiB buffer of
 *       pre-encoded frames, written again and again (9 bytes per token on the pipe), then a
 *       TURN_END {"status":"completed","tokens":N,"start_ns":..,"end_ns":..} (CLOCK_MONOTONIC
 *       of the first and last write, so the bench can tell whether the agent was the limit).
 *       PIPE_BYTES > 0 first asks F_SETPIPE_SZ for the events pipe (what the daemon could do).
 *
 *   bench_agent paced RATE PERIOD_MS MAX_S
 *       RATE tokens/s in bursts every PERIOD_MS ms on an absolute schedule (no drift), until
 *       SHUTDOWN / end of the control pipe, or MAX_S seconds, then a TURN_END
 *       {"status":"completed","bursts":B,"skipped":S} (S: bursts dropped because the agent
 *       woke more than a period late, e.g. for want of CPU). Each burst is ONE write(): a
 *       TOKEN "@" + 16 hex digits of CLOCK_MONOTONIC ns taken just before the write, then
 *       RATE*PERIOD_MS/1000 - 1 TOKENs "tok ". Between bursts it sleeps in ppoll() on the
 *       control pipe, so a control frame is read the moment it arrives:
 *         INTERRUPT -> TURN_END {"status":"interrupted","read_ns":T}
 *         INPUT     -> PROGRESS {"input_read_ns":T,"bytes":N}
 *       T = CLOCK_MONOTONIC ns right after the read() that completed the frame. The sandbox
 *       shares the host's CLOCK_MONOTONIC (no time namespace), so the bench subtracts its own
 *       send times from these.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EVENTS_FD 3
#define CONTROL_FD 4
#define T_TOKEN 0x01
#define T_TURN_END 0x02
#define T_PROGRESS 0x03
#define C_INPUT 0x81
#define C_INTERRUPT 0x82
#define C_SHUTDOWN 0x83

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void write_all(const char *p, size_t n) {
    while (n) {
        ssize_t w = write(EVENTS_FD, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            _exit(3); /* the daemon closed the pipe: nothing more to do */
        }
        p += w;
        n -= (size_t)w;
    }
}

static size_t put_frame(char *out, int type, const char *payload, size_t len) {
    out[0] = (char)(len & 0xff);
    out[1] = (char)((len >> 8) & 0xff);
    out[2] = (char)((len >> 16) & 0xff);
    out[3] = (char)((len >> 24) & 0xff);
    out[4] = (char)type;
    memcpy(out + 5, payload, len);
    return 5 + len;
}

static void send_json(int type, const char *json) {
    char buf[512];
    size_t n = put_frame(buf, type, json, strlen(json));
    write_all(buf, n);
}

static int blast(long long tokens, long pipe_bytes) {
    if (pipe_bytes > 0) fcntl(EVENTS_FD, F_SETPIPE_SZ, (int)pipe_bytes);
    enum { PER_BUF = 116508 }; /* 9-byte frames in just under 1 MiB */
    static char buf[PER_BUF * 9];
    for (int i = 0; i < PER_BUF; i++) put_frame(buf + 9 * i, T_TOKEN, "tok ", 4);
    uint64_t start = now_ns();
    long long left = tokens;
    while (left > 0) {
        long long n = left < PER_BUF ? left : PER_BUF;
        write_all(buf, (size_t)n * 9);
        left -= n;
    }
    uint64_t end = now_ns();
    char json[256];
    snprintf(json, sizeof json,
             "{\"status\":\"completed\",\"tokens\":%lld,\"start_ns\":%llu,\"end_ns\":%llu}",
             tokens, (unsigned long long)start, (unsigned long long)end);
    send_json(T_TURN_END, json);
    return 0;
}

/* control frames are tiny; a fixed inbox with compaction is enough */
static unsigned char inbox[1 << 21];
static size_t inbox_len;

/* returns 1 when the agent should exit */
static int handle_control(void) {
    for (;;) {
        ssize_t r = read(CONTROL_FD, inbox + inbox_len, sizeof inbox - inbox_len);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            return 1;
        }
        if (r == 0) return 1; /* end of the control pipe = SHUTDOWN */
        inbox_len += (size_t)r;
        if (inbox_len < sizeof inbox) break; /* short read: drained */
    }
    uint64_t t = now_ns();
    size_t pos = 0;
    while (inbox_len - pos >= 5) {
        uint32_t len = (uint32_t)inbox[pos] | (uint32_t)inbox[pos + 1] << 8 |
                       (uint32_t)inbox[pos + 2] << 16 | (uint32_t)inbox[pos + 3] << 24;
        int type = inbox[pos + 4];
        if (len > sizeof inbox - 5) return 1; /* not protocol v1 */
        if (inbox_len - pos < 5 + (size_t)len) break;
        char json[256];
        if (type == C_INTERRUPT) {
            snprintf(json, sizeof json, "{\"status\":\"interrupted\",\"read_ns\":%llu}",
                     (unsigned long long)t);
            send_json(T_TURN_END, json);
        } else if (type == C_INPUT) {
            snprintf(json, sizeof json, "{\"input_read_ns\":%llu,\"bytes\":%u}",
                     (unsigned long long)t, len);
            send_json(T_PROGRESS, json);
        } else if (type == C_SHUTDOWN) {
            return 1;
        }
        pos += 5 + (size_t)len;
    }
    memmove(inbox, inbox + pos, inbox_len - pos);
    inbox_len -= pos;
    return 0;
}

static int paced(long rate, double period_ms, double max_s) {
    long per_burst = (long)((double)rate * period_ms / 1000.0 + 0.5);
    if (per_burst < 1) per_burst = 1;
    size_t size = 5 + 17 + (size_t)(per_burst - 1) * 9;
    char *burst = malloc(size);
    if (!burst) return 2;
    for (long i = 1; i < per_burst; i++) put_frame(burst + 22 + 9 * (i - 1), T_TOKEN, "tok ", 4);
    fcntl(CONTROL_FD, F_SETFL, fcntl(CONTROL_FD, F_GETFL) | O_NONBLOCK);
    uint64_t period = (uint64_t)(period_ms * 1e6);
    uint64_t start = now_ns();
    uint64_t stop = start + (uint64_t)(max_s * 1e9);
    uint64_t next = start;
    unsigned long long bursts = 0, skipped = 0;
    struct pollfd pfd = {.fd = CONTROL_FD, .events = POLLIN};
    static const char hex[] = "0123456789abcdef";
    for (;;) {
        uint64_t now = now_ns();
        if (now >= stop) break;
        if (now >= next) {
            char stamp[17];
            uint64_t t = now_ns();
            stamp[0] = '@';
            for (int i = 0; i < 16; i++) stamp[1 + i] = hex[(t >> (60 - 4 * i)) & 0xf];
            put_frame(burst, T_TOKEN, stamp, 17);
            write_all(burst, size);
            bursts++;
            next += period;
            if (next < now) { /* more than a period late (descheduled): skip, no burst storm */
                skipped += (now - next) / period + 1;
                next = now + period;
            }
            continue;
        }
        uint64_t wait = next - now;
        struct timespec ts = {.tv_sec = (time_t)(wait / 1000000000ull),
                              .tv_nsec = (long)(wait % 1000000000ull)};
        int r = ppoll(&pfd, 1, &ts, NULL);
        if (r > 0) {
            if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
                if (handle_control()) break;
            }
        }
    }
    char json[256];
    snprintf(json, sizeof json, "{\"status\":\"completed\",\"bursts\":%llu,\"skipped\":%llu}",
             bursts, skipped);
    send_json(T_TURN_END, json);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "blast") == 0)
        return blast(atoll(argv[2]), argc >= 4 ? atol(argv[3]) : 0);
    if (argc >= 5 && strcmp(argv[1], "paced") == 0)
        return paced(atol(argv[2]), atof(argv[3]), atof(argv[4]));
    fprintf(stderr,
            "usage: bench_agent blast TOKENS [PIPE_BYTES]\n"
            "       bench_agent paced RATE PERIOD_MS MAX_S\n");
    return 2;
}
