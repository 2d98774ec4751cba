/*
 * p11bench — time a few PKCS#11 operations against one module.
 *
 * Build:  gcc -O2 -pthread -I/usr/include/p11-kit-1 p11bench.c -o p11bench -ldl
 *         (run.py does this into a temporary directory)
 * Run:    p11bench MODULE.so [options]        (see usage() below)
 *
 * The module is dlopen'ed with RTLD_NOW | RTLD_LOCAL, as C hosts such as
 * pkcs11-tool do, and initialised with CKF_OS_LOCKING_OK.  The first slot with
 * a token is used; the user logs in with --pin, else $P11BENCH_PIN, else 1234.
 *
 * Keys (EC P-256, RSA-2048, AES-256) are token objects found by label
 * (<prefix>-ec, <prefix>-rsa, <prefix>-aes) and generated when missing, or
 * session objects with --session-keys.
 *
 * Operations (each timed as a whole, including its *Init):
 *   random32  C_GenerateRandom, 32 bytes
 *   sessinfo  C_GetSessionInfo (diagnostic: no cryptography, the cheapest session call)
 *   ecdsa     C_SignInit(CKM_ECDSA) + C_Sign of a 32-byte hash
 *   rsa       C_SignInit(CKM_SHA256_RSA_PKCS) + C_Sign of 32 bytes
 *   aesgcm    C_EncryptInit(CKM_AES_GCM, 12-byte IV, 128-bit tag) + C_Encrypt of 1 KiB;
 *             a fresh IV each call (a per-thread counter)
 *
 * Output: one JSON object per line on stdout.
 *   {"kind":"info", ...}        module, token, C_Initialize and key set-up times
 *   {"kind":"latency", "op", "n", "median_us", "p90_us", "p99_us", "mean_us", "min_us", "max_us",
 *    and for ops with an *Init: "init_median_us", "call_median_us" (medians of each half)}
 *   {"kind":"throughput", "op", "threads", "seconds", "ops", "ops_per_s"}
 *   {"kind":"error", "op", "phase", "function", "rv", "rv_name"}
 * Exit status: 0 when every requested measurement ran, 1 when some failed,
 * 2 on usage or set-up errors.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

/* ------------------------------------------------------------------ util */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static const char *rv_name(CK_RV rv)
{
    switch (rv) {
#define RV(x) case x: return #x;
    RV(CKR_OK) RV(CKR_CANCEL) RV(CKR_HOST_MEMORY) RV(CKR_SLOT_ID_INVALID)
    RV(CKR_GENERAL_ERROR) RV(CKR_FUNCTION_FAILED) RV(CKR_ARGUMENTS_BAD)
    RV(CKR_ATTRIBUTE_READ_ONLY) RV(CKR_ATTRIBUTE_TYPE_INVALID)
    RV(CKR_ATTRIBUTE_VALUE_INVALID) RV(CKR_DATA_INVALID) RV(CKR_DATA_LEN_RANGE)
    RV(CKR_DEVICE_ERROR) RV(CKR_DEVICE_MEMORY) RV(CKR_DEVICE_REMOVED)
    RV(CKR_FUNCTION_CANCELED) RV(CKR_FUNCTION_NOT_SUPPORTED)
    RV(CKR_KEY_HANDLE_INVALID) RV(CKR_KEY_SIZE_RANGE) RV(CKR_KEY_TYPE_INCONSISTENT)
    RV(CKR_KEY_FUNCTION_NOT_PERMITTED) RV(CKR_MECHANISM_INVALID)
    RV(CKR_MECHANISM_PARAM_INVALID) RV(CKR_OBJECT_HANDLE_INVALID)
    RV(CKR_OPERATION_ACTIVE) RV(CKR_OPERATION_NOT_INITIALIZED) RV(CKR_PIN_INCORRECT)
    RV(CKR_SESSION_CLOSED) RV(CKR_SESSION_COUNT) RV(CKR_SESSION_HANDLE_INVALID)
    RV(CKR_SESSION_READ_ONLY) RV(CKR_TEMPLATE_INCOMPLETE) RV(CKR_TEMPLATE_INCONSISTENT)
    RV(CKR_TOKEN_NOT_PRESENT) RV(CKR_TOKEN_NOT_RECOGNIZED) RV(CKR_USER_NOT_LOGGED_IN)
    RV(CKR_USER_ALREADY_LOGGED_IN) RV(CKR_BUFFER_TOO_SMALL)
    RV(CKR_CRYPTOKI_NOT_INITIALIZED) RV(CKR_CRYPTOKI_ALREADY_INITIALIZED)
    RV(CKR_DOMAIN_PARAMS_INVALID) RV(CKR_CANT_LOCK)
#undef RV
    default: return "CKR_?";
    }
}

/* JSON string: copy a blank-padded PKCS#11 field, escape, trim. */
static void json_field(char *out, size_t outsz, const unsigned char *in, size_t n)
{
    while (n > 0 && (in[n - 1] == ' ' || in[n - 1] == 0))
        n--;
    size_t o = 0;
    for (size_t i = 0; i < n && o + 7 < outsz; i++) {
        unsigned char c = in[i];
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20 || c >= 0x7f) {
            o += (size_t)snprintf(out + o, outsz - o, "\\u%04x", c);
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = 0;
}

static int failures;

static void report_error(const char *op, const char *phase, const char *fn, CK_RV rv)
{
    failures++;
    printf("{\"kind\":\"error\",\"op\":\"%s\",\"phase\":\"%s\",\"function\":\"%s\","
           "\"rv\":\"0x%08lx\",\"rv_name\":\"%s\"}\n",
           op, phase, fn, (unsigned long)rv, rv_name(rv));
    fflush(stdout);
}

/* ------------------------------------------------------------- module */

static CK_FUNCTION_LIST_PTR F;
static CK_SLOT_ID slot;
static CK_OBJECT_HANDLE ec_priv, rsa_priv, aes_key;

/* Each op fills `fn` with the name of the failing function and, when `tmid`
 * is not NULL and the op has an *Init, stores the time between Init and op. */
typedef CK_RV (*op_fn)(CK_SESSION_HANDLE s, unsigned char *buf, const char **fn,
                       double *tmid);

static unsigned char hash32[32];
static unsigned char plain1k[1024];
static unsigned char gcm_iv[12];     /* prefix; the last 8 bytes count per call */
static __thread uint64_t gcm_ctr;    /* per thread: every call gets a fresh IV, as
                                        GCM requires and as real applications do */

static CK_RV op_random32(CK_SESSION_HANDLE s, unsigned char *buf, const char **fn,
                         double *tmid)
{
    (void)tmid;
    *fn = "C_GenerateRandom";
    return F->C_GenerateRandom(s, buf, 32);
}

static CK_RV op_sessinfo(CK_SESSION_HANDLE s, unsigned char *buf, const char **fn,
                         double *tmid)
{
    (void)tmid;
    *fn = "C_GetSessionInfo";
    return F->C_GetSessionInfo(s, (CK_SESSION_INFO *)(void *)buf);
}

static CK_RV op_ecdsa(CK_SESSION_HANDLE s, unsigned char *buf, const char **fn,
                   double *tmid)
{
    CK_MECHANISM m = { CKM_ECDSA, NULL, 0 };
    CK_ULONG len = 256;
    CK_RV rv;
    *fn = "C_SignInit";
    if ((rv = F->C_SignInit(s, &m, ec_priv)) != CKR_OK)
        return rv;
    if (tmid)
        *tmid = now_s();
    *fn = "C_Sign";
    return F->C_Sign(s, hash32, sizeof hash32, buf, &len);
}

static CK_RV op_rsa(CK_SESSION_HANDLE s, unsigned char *buf, const char **fn,
                 double *tmid)
{
    CK_MECHANISM m = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    CK_ULONG len = 512;
    CK_RV rv;
    *fn = "C_SignInit";
    if ((rv = F->C_SignInit(s, &m, rsa_priv)) != CKR_OK)
        return rv;
    if (tmid)
        *tmid = now_s();
    *fn = "C_Sign";
    return F->C_Sign(s, hash32, sizeof hash32, buf, &len);
}

static CK_RV op_aesgcm(CK_SESSION_HANDLE s, unsigned char *buf, const char **fn,
                    double *tmid)
{
    CK_GCM_PARAMS p;
    memset(&p, 0, sizeof p);
    unsigned char iv[sizeof gcm_iv];
    uint64_t c = ++gcm_ctr ^ ((uint64_t)(uintptr_t)&gcm_ctr << 20);
    memcpy(iv, gcm_iv, 4);
    memcpy(iv + 4, &c, 8);
    p.pIv = iv;
    p.ulIvLen = sizeof iv;
    p.ulIvBits = sizeof iv * 8;
    p.pAAD = NULL;
    p.ulAADLen = 0;
    p.ulTagBits = 128;
    CK_MECHANISM m = { CKM_AES_GCM, &p, sizeof p };
    CK_ULONG len = sizeof plain1k + 16;
    CK_RV rv;
    *fn = "C_EncryptInit";
    if ((rv = F->C_EncryptInit(s, &m, aes_key)) != CKR_OK)
        return rv;
    if (tmid)
        *tmid = now_s();
    *fn = "C_Encrypt";
    return F->C_Encrypt(s, plain1k, sizeof plain1k, buf, &len);
}

#define BUFSZ 4096

static const struct {
    const char *name;
    op_fn fn;
    int needs; /* 0 none, 1 ec, 2 rsa, 3 aes */
} OPS[] = {
    { "random32", op_random32, 0 },
    { "sessinfo", op_sessinfo, 0 },
    { "ecdsa", op_ecdsa, 1 },
    { "rsa", op_rsa, 2 },
    { "aesgcm", op_aesgcm, 3 },
};
#define NOPS (sizeof OPS / sizeof OPS[0])

/* ----------------------------------------------------------- keys */

static CK_BBOOL T_ = CK_TRUE, F_ = CK_FALSE;

static CK_RV find_one(CK_SESSION_HANDLE s, CK_OBJECT_CLASS cls, const char *label,
                      CK_OBJECT_HANDLE *out)
{
    CK_ATTRIBUTE t[] = {
        { CKA_CLASS, &cls, sizeof cls },
        { CKA_LABEL, (void *)label, strlen(label) },
        { CKA_TOKEN, &T_, sizeof T_ },
    };
    CK_ULONG n = 0;
    CK_RV rv = F->C_FindObjectsInit(s, t, 3);
    if (rv != CKR_OK)
        return rv;
    *out = CK_INVALID_HANDLE;
    rv = F->C_FindObjects(s, out, 1, &n);
    F->C_FindObjectsFinal(s);
    if (rv == CKR_OK && n == 0)
        *out = CK_INVALID_HANDLE;
    return rv;
}

static int get_keys(CK_SESSION_HANDLE s, const char *prefix, int token, int need_mask,
                    int *created)
{
    char l_ec[128], l_rsa[128], l_aes[128];
    snprintf(l_ec, sizeof l_ec, "%s-ec", prefix);
    snprintf(l_rsa, sizeof l_rsa, "%s-rsa", prefix);
    snprintf(l_aes, sizeof l_aes, "%s-aes", prefix);
    CK_BBOOL tok = token ? CK_TRUE : CK_FALSE;
    CK_RV rv;
    *created = 0;

    if (need_mask & 2) { /* EC P-256 */
        if (token && (rv = find_one(s, CKO_PRIVATE_KEY, l_ec, &ec_priv)) != CKR_OK) {
            report_error("setup", "find", "C_FindObjects", rv);
            return -1;
        }
        if (!token || ec_priv == CK_INVALID_HANDLE) {
            static unsigned char p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
                                            0x3d, 0x03, 0x01, 0x07 };
            CK_MECHANISM m = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
            CK_ATTRIBUTE pub[] = {
                { CKA_TOKEN, &tok, sizeof tok },
                { CKA_LABEL, l_ec, strlen(l_ec) },
                { CKA_ID, l_ec, strlen(l_ec) },
                { CKA_EC_PARAMS, p256, sizeof p256 },
                { CKA_VERIFY, &T_, sizeof T_ },
            };
            CK_ATTRIBUTE prv[] = {
                { CKA_TOKEN, &tok, sizeof tok },
                { CKA_LABEL, l_ec, strlen(l_ec) },
                { CKA_ID, l_ec, strlen(l_ec) },
                { CKA_PRIVATE, &T_, sizeof T_ },
                { CKA_SENSITIVE, &T_, sizeof T_ },
                { CKA_SIGN, &T_, sizeof T_ },
            };
            CK_OBJECT_HANDLE h_pub;
            rv = F->C_GenerateKeyPair(s, &m, pub, 5, prv, 6, &h_pub, &ec_priv);
            if (rv != CKR_OK) {
                report_error("setup", "keygen-ec", "C_GenerateKeyPair", rv);
                return -1;
            }
            (*created)++;
        }
    }
    if (need_mask & 4) { /* RSA-2048 */
        if (token && (rv = find_one(s, CKO_PRIVATE_KEY, l_rsa, &rsa_priv)) != CKR_OK) {
            report_error("setup", "find", "C_FindObjects", rv);
            return -1;
        }
        if (!token || rsa_priv == CK_INVALID_HANDLE) {
            static unsigned char e65537[] = { 0x01, 0x00, 0x01 };
            CK_ULONG bits = 2048;
            CK_MECHANISM m = { CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0 };
            CK_ATTRIBUTE pub[] = {
                { CKA_TOKEN, &tok, sizeof tok },
                { CKA_LABEL, l_rsa, strlen(l_rsa) },
                { CKA_ID, l_rsa, strlen(l_rsa) },
                { CKA_MODULUS_BITS, &bits, sizeof bits },
                { CKA_PUBLIC_EXPONENT, e65537, sizeof e65537 },
                { CKA_VERIFY, &T_, sizeof T_ },
            };
            CK_ATTRIBUTE prv[] = {
                { CKA_TOKEN, &tok, sizeof tok },
                { CKA_LABEL, l_rsa, strlen(l_rsa) },
                { CKA_ID, l_rsa, strlen(l_rsa) },
                { CKA_PRIVATE, &T_, sizeof T_ },
                { CKA_SENSITIVE, &T_, sizeof T_ },
                { CKA_SIGN, &T_, sizeof T_ },
            };
            CK_OBJECT_HANDLE h_pub;
            rv = F->C_GenerateKeyPair(s, &m, pub, 6, prv, 6, &h_pub, &rsa_priv);
            if (rv != CKR_OK) {
                report_error("setup", "keygen-rsa", "C_GenerateKeyPair", rv);
                return -1;
            }
            (*created)++;
        }
    }
    if (need_mask & 8) { /* AES-256 */
        if (token && (rv = find_one(s, CKO_SECRET_KEY, l_aes, &aes_key)) != CKR_OK) {
            report_error("setup", "find", "C_FindObjects", rv);
            return -1;
        }
        if (!token || aes_key == CK_INVALID_HANDLE) {
            CK_ULONG vlen = 32;
            CK_MECHANISM m = { CKM_AES_KEY_GEN, NULL, 0 };
            CK_ATTRIBUTE t[] = {
                { CKA_TOKEN, &tok, sizeof tok },
                { CKA_LABEL, l_aes, strlen(l_aes) },
                { CKA_ID, l_aes, strlen(l_aes) },
                { CKA_VALUE_LEN, &vlen, sizeof vlen },
                { CKA_PRIVATE, &T_, sizeof T_ },
                { CKA_SENSITIVE, &T_, sizeof T_ },
                { CKA_ENCRYPT, &T_, sizeof T_ },
                { CKA_DECRYPT, &T_, sizeof T_ },
            };
            rv = F->C_GenerateKey(s, &m, t, 8, &aes_key);
            if (rv != CKR_OK) {
                report_error("setup", "keygen-aes", "C_GenerateKey", rv);
                return -1;
            }
            (*created)++;
        }
    }
    (void)F_;
    return 0;
}

/* ------------------------------------------------------------ latency */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* nearest-rank percentile of a sorted array */
static double pct(const double *v, size_t n, double p)
{
    double x = p * (double)n;
    size_t k = (size_t)x;
    if ((double)k < x)
        k++; /* ceil without libm */
    if (k < 1)
        k = 1;
    if (k > n)
        k = n;
    return v[k - 1];
}

static void run_latency(CK_SESSION_HANDLE s, size_t oi, long warmup, long iters,
                        long min_iters, double budget_s)
{
    unsigned char *buf = malloc(BUFSZ);
    double *v = malloc(sizeof(double) * (size_t)iters);
    double *vi = malloc(sizeof(double) * (size_t)iters); /* Init part */
    double *vo = malloc(sizeof(double) * (size_t)iters); /* op part */
    double tm;
    long ni = 0;
    const char *fn = "";
    CK_RV rv;
    double w_end = now_s() + budget_s * 0.2; /* warm-up: count, bounded in time */
    for (long i = 0; i < warmup; i++) {
        if ((rv = OPS[oi].fn(s, buf, &fn, NULL)) != CKR_OK) {
            report_error(OPS[oi].name, "latency", fn, rv);
            goto out;
        }
        if (i >= 3 && now_s() > w_end)
            break;
    }
    long n = 0;
    double t_start = now_s(), t0, t1 = t_start;
    while (n < iters) {
        t0 = now_s();
        tm = -1.0;
        rv = OPS[oi].fn(s, buf, &fn, &tm);
        t1 = now_s();
        if (rv != CKR_OK) {
            report_error(OPS[oi].name, "latency", fn, rv);
            goto out;
        }
        if (tm > 0) {
            vi[ni] = (tm - t0) * 1e6;
            vo[ni++] = (t1 - tm) * 1e6;
        }
        v[n++] = (t1 - t0) * 1e6;
        if (n >= min_iters && t1 - t_start > budget_s)
            break;
    }
    double sum = 0;
    for (long i = 0; i < n; i++)
        sum += v[i];
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    double med = (n % 2) ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
    printf("{\"kind\":\"latency\",\"op\":\"%s\",\"n\":%ld,\"median_us\":%.3f,"
           "\"p90_us\":%.3f,\"p99_us\":%.3f,\"mean_us\":%.3f,\"min_us\":%.3f,"
           "\"max_us\":%.3f,\"seconds\":%.3f",
           OPS[oi].name, n, med, pct(v, (size_t)n, 0.90), pct(v, (size_t)n, 0.99),
           sum / (double)n, v[0], v[n - 1], t1 - t_start);
    if (ni == n) { /* the op has an *Init: medians of its two halves */
        qsort(vi, (size_t)ni, sizeof(double), cmp_double);
        qsort(vo, (size_t)ni, sizeof(double), cmp_double);
        printf(",\"init_median_us\":%.3f,\"call_median_us\":%.3f",
               pct(vi, (size_t)ni, 0.5), pct(vo, (size_t)ni, 0.5));
    }
    printf("}\n");
    fflush(stdout);
out:
    free(v);
    free(vi);
    free(vo);
    free(buf);
}

/* --------------------------------------------------------- throughput */

struct worker {
    pthread_t th;
    size_t oi;
    pthread_barrier_t *bar;
    atomic_int *stop;
    double warm_s;
    long ops;
    double t_end;
    CK_RV rv;
    const char *fn;
};

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    unsigned char *buf = malloc(BUFSZ);
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    w->rv = F->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s);
    w->fn = "C_OpenSession";
    if (w->rv == CKR_OK) { /* warm-up in this thread's own session */
        double end = now_s() + w->warm_s;
        for (int i = 0; i < 3 || now_s() < end; i++)
            if ((w->rv = OPS[w->oi].fn(s, buf, &w->fn, NULL)) != CKR_OK)
                break;
    }
    pthread_barrier_wait(w->bar);
    if (w->rv == CKR_OK) {
        while (!atomic_load_explicit(w->stop, memory_order_relaxed)) {
            if ((w->rv = OPS[w->oi].fn(s, buf, &w->fn, NULL)) != CKR_OK)
                break;
            w->ops++;
        }
    }
    w->t_end = now_s();
    pthread_barrier_wait(w->bar);
    if (s != CK_INVALID_HANDLE)
        F->C_CloseSession(s);
    free(buf);
    return NULL;
}

static void run_throughput(size_t oi, int nthreads, double seconds, double warm_s)
{
    pthread_barrier_t bar;
    atomic_int stop = 0;
    struct worker *w = calloc((size_t)nthreads, sizeof *w);
    pthread_barrier_init(&bar, NULL, (unsigned)nthreads + 1);
    for (int i = 0; i < nthreads; i++) {
        w[i].oi = oi;
        w[i].bar = &bar;
        w[i].stop = &stop;
        w[i].warm_s = warm_s;
        if (pthread_create(&w[i].th, NULL, worker_main, &w[i]) != 0) {
            fprintf(stderr, "p11bench: pthread_create failed\n");
            exit(2);
        }
    }
    pthread_barrier_wait(&bar); /* all warmed up and ready */
    double t0 = now_s();
    struct timespec ts = { (time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9) };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
    atomic_store(&stop, 1);
    pthread_barrier_wait(&bar); /* all stopped */
    long total = 0;
    double t_end = t0;
    int bad = -1;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(w[i].th, NULL);
        total += w[i].ops;
        if (w[i].t_end > t_end)
            t_end = w[i].t_end;
        if (w[i].rv != CKR_OK && bad < 0)
            bad = i;
    }
    if (bad >= 0)
        report_error(OPS[oi].name, "throughput", w[bad].fn, w[bad].rv);
    else
        printf("{\"kind\":\"throughput\",\"op\":\"%s\",\"threads\":%d,\"seconds\":%.3f,"
               "\"ops\":%ld,\"ops_per_s\":%.1f}\n",
               OPS[oi].name, nthreads, t_end - t0, total, (double)total / (t_end - t0));
    fflush(stdout);
    pthread_barrier_destroy(&bar);
    free(w);
}

/* --------------------------------------------------------------- main */

static void usage(FILE *f)
{
    fprintf(f,
        "usage: p11bench MODULE.so [options]\n"
        "  --pin PIN            user PIN (default $P11BENCH_PIN, else 1234)\n"
        "  --ops LIST           comma list of random32,sessinfo,ecdsa,rsa,aesgcm\n"
        "                       (default random32,ecdsa,rsa,aesgcm)\n"
        "  --iters N            max timed calls per op for latency (default 200000)\n"
        "  --min-iters N        min timed calls per op (default 50)\n"
        "  --warmup N           max warm-up calls per op (default 200)\n"
        "  --lat-seconds S      time budget per op for latency (default 1.0)\n"
        "  --threads LIST       comma list of thread counts for throughput (default 4)\n"
        "  --seconds S          duration of each throughput measurement (default 2.0)\n"
        "  --warm-seconds S     per-thread warm-up before throughput (default 0.2)\n"
        "  --no-latency | --no-throughput\n"
        "  --session-keys       generate session keys instead of finding token keys\n"
        "  --label-prefix P     key labels P-ec, P-rsa, P-aes (default p11bench)\n"
        "  --setup-only         find or create the keys, then exit\n");
}

int main(int argc, char **argv)
{
    const char *pin = getenv("P11BENCH_PIN");
    const char *ops_arg = "random32,ecdsa,rsa,aesgcm";
    const char *threads_arg = "4";
    const char *prefix = "p11bench";
    long iters = 200000, min_iters = 50, warmup = 200;
    double lat_s = 1.0, tput_s = 2.0, warm_s = 0.2;
    int do_lat = 1, do_tput = 1, token_keys = 1, setup_only = 0;
    if (!pin)
        pin = "1234";

    static struct option lo[] = {
        { "pin", 1, 0, 'p' },        { "ops", 1, 0, 'o' },
        { "iters", 1, 0, 'n' },      { "min-iters", 1, 0, 'm' },
        { "warmup", 1, 0, 'w' },     { "lat-seconds", 1, 0, 'l' },
        { "threads", 1, 0, 't' },    { "seconds", 1, 0, 's' },
        { "warm-seconds", 1, 0, 'W' }, { "no-latency", 0, 0, 'L' },
        { "no-throughput", 0, 0, 'T' }, { "session-keys", 0, 0, 'k' },
        { "label-prefix", 1, 0, 'P' }, { "setup-only", 0, 0, 'S' },
        { "help", 0, 0, 'h' },       { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case 'p': pin = optarg; break;
        case 'o': ops_arg = optarg; break;
        case 'n': iters = atol(optarg); break;
        case 'm': min_iters = atol(optarg); break;
        case 'w': warmup = atol(optarg); break;
        case 'l': lat_s = atof(optarg); break;
        case 't': threads_arg = optarg; break;
        case 's': tput_s = atof(optarg); break;
        case 'W': warm_s = atof(optarg); break;
        case 'L': do_lat = 0; break;
        case 'T': do_tput = 0; break;
        case 'k': token_keys = 0; break;
        case 'P': prefix = optarg; break;
        case 'S': setup_only = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc - 1 || iters < 1 || min_iters < 1) {
        usage(stderr);
        return 2;
    }
    if (min_iters > iters)
        min_iters = iters;
    const char *module = argv[optind];

    /* which ops */
    int want[NOPS] = { 0 };
    int need_mask = 0;
    {
        char *dup = strdup(ops_arg), *save = NULL;
        for (char *tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            size_t i;
            for (i = 0; i < NOPS; i++)
                if (strcmp(tok, OPS[i].name) == 0)
                    break;
            if (i == NOPS) {
                fprintf(stderr, "p11bench: unknown op '%s'\n", tok);
                return 2;
            }
            want[i] = 1;
            need_mask |= 1 << OPS[i].needs;
        }
        free(dup);
    }
    if (setup_only)
        need_mask = 2 | 4 | 8;

    for (size_t i = 0; i < sizeof hash32; i++)
        hash32[i] = (unsigned char)(i * 7 + 1);
    for (size_t i = 0; i < sizeof plain1k; i++)
        plain1k[i] = (unsigned char)i;
    for (size_t i = 0; i < sizeof gcm_iv; i++)
        gcm_iv[i] = (unsigned char)(0xa0 + i);

    double t_load = now_s();
    void *lib = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "p11bench: dlopen %s: %s\n", module, dlerror());
        return 2;
    }
    CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    if (!gfl) {
        fprintf(stderr, "p11bench: %s has no C_GetFunctionList\n", module);
        return 2;
    }
    CK_RV rv = gfl(&F);
    if (rv != CKR_OK || !F) {
        fprintf(stderr, "p11bench: C_GetFunctionList: %s\n", rv_name(rv));
        return 2;
    }
    double t_init = now_s();
    CK_C_INITIALIZE_ARGS ia;
    memset(&ia, 0, sizeof ia);
    ia.flags = CKF_OS_LOCKING_OK;
    if ((rv = F->C_Initialize(&ia)) != CKR_OK) {
        report_error("setup", "init", "C_Initialize", rv);
        return 2;
    }
    double t_inited = now_s();

    CK_ULONG nslots = 0;
    if ((rv = F->C_GetSlotList(CK_TRUE, NULL, &nslots)) != CKR_OK || nslots == 0) {
        report_error("setup", "slots", "C_GetSlotList", rv);
        fprintf(stderr, "p11bench: no slot with a token\n");
        return 2;
    }
    CK_SLOT_ID *slots = calloc(nslots, sizeof *slots);
    if ((rv = F->C_GetSlotList(CK_TRUE, slots, &nslots)) != CKR_OK || nslots == 0) {
        report_error("setup", "slots", "C_GetSlotList", rv);
        return 2;
    }
    slot = slots[0];
    free(slots);

    CK_INFO info;
    CK_TOKEN_INFO ti;
    char manuf[200] = "", libdesc[200] = "", toklabel[200] = "", tokmodel[200] = "";
    if (F->C_GetInfo(&info) == CKR_OK) {
        json_field(manuf, sizeof manuf, info.manufacturerID, sizeof info.manufacturerID);
        json_field(libdesc, sizeof libdesc, info.libraryDescription,
                   sizeof info.libraryDescription);
    }
    if (F->C_GetTokenInfo(slot, &ti) == CKR_OK) {
        json_field(toklabel, sizeof toklabel, ti.label, sizeof ti.label);
        json_field(tokmodel, sizeof tokmodel, ti.model, sizeof ti.model);
    }

    CK_SESSION_HANDLE s;
    if ((rv = F->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s))
        != CKR_OK) {
        report_error("setup", "session", "C_OpenSession", rv);
        return 2;
    }
    rv = F->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        report_error("setup", "login", "C_Login", rv);
        return 2;
    }
    double t_keys = now_s();
    int created = 0;
    if (get_keys(s, prefix, token_keys, need_mask, &created) != 0)
        return 2;
    double t_ready = now_s();

    char modjson[1024];
    json_field(modjson, sizeof modjson, (const unsigned char *)module, strlen(module));
    printf("{\"kind\":\"info\",\"module\":\"%s\",\"manufacturer\":\"%s\",\"library\":\"%s\","
           "\"slot\":%lu,\"token\":\"%s\",\"model\":\"%s\",\"slots_with_token\":%lu,"
           "\"load_ms\":%.3f,\"initialize_ms\":%.3f,\"keys_ms\":%.3f,\"keys_created\":%d,"
           "\"token_keys\":%s}\n",
           modjson, manuf, libdesc, (unsigned long)slot, toklabel, tokmodel,
           (unsigned long)nslots, (t_init - t_load) * 1e3, (t_inited - t_init) * 1e3,
           (t_ready - t_keys) * 1e3, created, token_keys ? "true" : "false");
    fflush(stdout);

    if (!setup_only) {
        if (do_lat)
            for (size_t i = 0; i < NOPS; i++)
                if (want[i])
                    run_latency(s, i, warmup, iters, min_iters, lat_s);
        if (do_tput) {
            char *dup = strdup(threads_arg), *save = NULL;
            for (char *tok = strtok_r(dup, ",", &save); tok;
                 tok = strtok_r(NULL, ",", &save)) {
                int nt = atoi(tok);
                if (nt < 1) {
                    fprintf(stderr, "p11bench: bad thread count '%s'\n", tok);
                    return 2;
                }
                for (size_t i = 0; i < NOPS; i++)
                    if (want[i])
                        run_throughput(i, nt, tput_s, warm_s);
            }
            free(dup);
        }
    }

    F->C_Logout(s);
    F->C_CloseSession(s);
    double t_fin = now_s();
    rv = F->C_Finalize(NULL);
    printf("{\"kind\":\"done\",\"finalize_ms\":%.3f,\"finalize_rv\":\"%s\",\"failures\":%d}\n",
           (now_s() - t_fin) * 1e3, rv_name(rv), failures);
    fflush(stdout);
    /* no dlclose: some modules (and embedded interpreters) do not survive it */
    return failures ? 1 : 0;
}
