/* A native multi-threaded PKCS#11 host.
 *
 *   threads MODULE TOKEN_LABEL PIN KEY_LABEL MODE THREADS ITERATIONS
 *
 * dlopen()s MODULE, C_Initialize()s it according to MODE
 *   os     CK_C_INITIALIZE_ARGS with CKF_OS_LOCKING_OK
 *   null   C_Initialize(NULL): the application promises not to call concurrently,
 *          so this host serialises its own calls with one mutex (calls still come
 *          from 8 different OS threads)
 *   mutex  CK_C_INITIALIZE_ARGS with pthread CreateMutex/DestroyMutex/LockMutex/
 *          UnlockMutex callbacks and no flags
 * logs in, finds the EC private/public key labelled KEY_LABEL, and runs THREADS
 * threads; each opens its own session and does ITERATIONS x (C_GenerateRandom,
 * C_Digest(SHA-256) of a known message, ECDSA C_Sign + C_Verify, and every 25th
 * iteration a C_Verify of a corrupted signature, which must be
 * CKR_SIGNATURE_INVALID).  Every rv is checked.  Prints one "RESULT ..." line and
 * exits 0 only if nothing failed.
 *
 * Build: gcc -O2 -Wall -pthread -I/usr/include/p11-kit-1 threads.c -o threads -ldl
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST_PTR F;
static const char *mode;
static int serialise;                       /* mode null: one call at a time */
static pthread_mutex_t serial_lock = PTHREAD_MUTEX_INITIALIZER;
static CK_SLOT_ID slot;
static CK_OBJECT_HANDLE priv_key, pub_key;
static int iterations;
static int failures;                        /* atomic */
static long ops;                            /* atomic */
static long mutex_created, mutex_destroyed, mutex_locked, mutex_unlocked;

static const CK_BYTE MSG[] = "abc";
static const CK_BYTE SHA256_ABC[32] = {
    0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
    0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad};

#define LOCK()   do { if (serialise) pthread_mutex_lock(&serial_lock); } while (0)
#define UNLOCK() do { if (serialise) pthread_mutex_unlock(&serial_lock); } while (0)
/* call F->fn(...) (serialised in mode null), store the rv in `rv` */
#define CALL(fn, ...) do { LOCK(); rv = F->fn(__VA_ARGS__); UNLOCK(); \
                           __atomic_fetch_add(&ops, 1, __ATOMIC_RELAXED); } while (0)

static void fail(int tid, int iter, const char *what, CK_RV rv, CK_RV want)
{
    int n = __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);
    if (n < 20)
        fprintf(stderr, "FAIL thread %d iteration %d %s rv=0x%08lx want=0x%08lx\n",
                tid, iter, what, (unsigned long)rv, (unsigned long)want);
}
#define EXPECT(what, want) do { if (rv != (want)) { fail(tid, it, what, rv, want); goto out; } } while (0)

/* --- application-supplied mutexes (mode mutex) --- */
static CK_RV create_mutex(void **m)
{
    pthread_mutex_t *p = malloc(sizeof *p);
    if (!p) return CKR_HOST_MEMORY;
    pthread_mutex_init(p, NULL);
    *m = p;
    __atomic_fetch_add(&mutex_created, 1, __ATOMIC_RELAXED);
    return CKR_OK;
}
static CK_RV destroy_mutex(void *m)
{
    pthread_mutex_destroy(m);
    free(m);
    __atomic_fetch_add(&mutex_destroyed, 1, __ATOMIC_RELAXED);
    return CKR_OK;
}
static CK_RV lock_mutex(void *m)
{
    __atomic_fetch_add(&mutex_locked, 1, __ATOMIC_RELAXED);
    return pthread_mutex_lock(m) ? CKR_GENERAL_ERROR : CKR_OK;
}
static CK_RV unlock_mutex(void *m)
{
    __atomic_fetch_add(&mutex_unlocked, 1, __ATOMIC_RELAXED);
    return pthread_mutex_unlock(m) ? CKR_MUTEX_NOT_LOCKED : CKR_OK;
}

static void *worker(void *arg)
{
    int tid = (int)(long)arg, it = -1;
    CK_RV rv;
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    CK_MECHANISM sha = {CKM_SHA256, NULL, 0}, ecdsa = {CKM_ECDSA, NULL, 0};
    CK_BYTE rnd[32], prev[32] = {0}, dig[64], sig[128];
    CK_ULONG n;

    CALL(C_OpenSession, slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
    EXPECT("C_OpenSession", CKR_OK);
    for (it = 0; it < iterations; it++) {
        CALL(C_GenerateRandom, s, rnd, sizeof rnd);
        EXPECT("C_GenerateRandom", CKR_OK);
        if (memcmp(rnd, prev, sizeof rnd) == 0) { fail(tid, it, "random repeated", 0, 0); goto out; }
        memcpy(prev, rnd, sizeof rnd);

        CALL(C_DigestInit, s, &sha);
        EXPECT("C_DigestInit", CKR_OK);
        n = sizeof dig;
        CALL(C_Digest, s, (CK_BYTE_PTR)MSG, 3, dig, &n);
        EXPECT("C_Digest", CKR_OK);
        if (n != 32 || memcmp(dig, SHA256_ABC, 32)) { fail(tid, it, "digest value", 0, 0); goto out; }

        CALL(C_SignInit, s, &ecdsa, priv_key);
        EXPECT("C_SignInit", CKR_OK);
        n = sizeof sig;
        CALL(C_Sign, s, rnd, sizeof rnd, sig, &n);   /* sign the random "hash" */
        EXPECT("C_Sign", CKR_OK);
        if (n != 64) { fail(tid, it, "signature length", n, 64); goto out; }

        CALL(C_VerifyInit, s, &ecdsa, pub_key);
        EXPECT("C_VerifyInit", CKR_OK);
        CALL(C_Verify, s, rnd, sizeof rnd, sig, n);
        EXPECT("C_Verify", CKR_OK);

        if (it % 25 == 0) {
            sig[7] ^= 0x01;
            CALL(C_VerifyInit, s, &ecdsa, pub_key);
            EXPECT("C_VerifyInit", CKR_OK);
            CALL(C_Verify, s, rnd, sizeof rnd, sig, n);
            EXPECT("C_Verify(corrupted)", CKR_SIGNATURE_INVALID);
        }
    }
    it = -1;
out:
    if (s != CK_INVALID_HANDLE) {
        CALL(C_CloseSession, s);
        if (rv != CKR_OK) fail(tid, it, "C_CloseSession", rv, CKR_OK);
    }
    return NULL;
}

static CK_OBJECT_HANDLE find_key(CK_SESSION_HANDLE s, CK_OBJECT_CLASS cls, const char *label)
{
    CK_RV rv;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls},
                        {CKA_LABEL, (void *)label, strlen(label)}};
    CK_OBJECT_HANDLE h[2];
    CK_ULONG n = 0;
    int tid = -1, it = -1;
    CALL(C_FindObjectsInit, s, t, 2);
    EXPECT("C_FindObjectsInit", CKR_OK);
    CALL(C_FindObjects, s, h, 2, &n);
    EXPECT("C_FindObjects", CKR_OK);
    CALL(C_FindObjectsFinal, s);
    EXPECT("C_FindObjectsFinal", CKR_OK);
    if (n != 1) { fprintf(stderr, "found %lu keys of class %lu labelled %s\n", n, cls, label); exit(2); }
    return h[0];
out:
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: %s MODULE TOKEN_LABEL PIN KEY_LABEL os|null|mutex THREADS ITERATIONS\n", argv[0]);
        return 2;
    }
    const char *module = argv[1], *token = argv[2], *pin = argv[3], *key = argv[4];
    int nthreads = atoi(argv[6]), tid = -1, it = -1;
    mode = argv[5];
    iterations = atoi(argv[7]);
    CK_RV rv;

    void *h = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
    CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
    if (!gfl) { fprintf(stderr, "no C_GetFunctionList\n"); return 2; }
    rv = gfl(&F);
    if (rv != CKR_OK || !F) { fprintf(stderr, "C_GetFunctionList rv=0x%lx\n", rv); return 2; }

    CK_C_INITIALIZE_ARGS args;
    memset(&args, 0, sizeof args);
    if (!strcmp(mode, "os")) {
        args.flags = CKF_OS_LOCKING_OK;
        CALL(C_Initialize, &args);
    } else if (!strcmp(mode, "null")) {
        serialise = 1;
        CALL(C_Initialize, NULL);
    } else if (!strcmp(mode, "mutex")) {
        args.CreateMutex = create_mutex;
        args.DestroyMutex = destroy_mutex;
        args.LockMutex = lock_mutex;
        args.UnlockMutex = unlock_mutex;
        CALL(C_Initialize, &args);
    } else {
        fprintf(stderr, "bad mode %s\n", mode);
        return 2;
    }
    EXPECT("C_Initialize", CKR_OK);

    CK_INFO info;
    CALL(C_GetInfo, &info);
    EXPECT("C_GetInfo", CKR_OK);

    /* the slot whose token carries TOKEN_LABEL */
    CK_SLOT_ID slots[64];
    CK_ULONG ns = 64;
    CALL(C_GetSlotList, CK_TRUE, slots, &ns);
    EXPECT("C_GetSlotList", CKR_OK);
    char want[33];
    snprintf(want, sizeof want, "%-32s", token);
    int found = 0;
    for (CK_ULONG i = 0; i < ns && !found; i++) {
        CK_TOKEN_INFO ti;
        CALL(C_GetTokenInfo, slots[i], &ti);
        if (rv == CKR_OK && !memcmp(ti.label, want, 32)) { slot = slots[i]; found = 1; }
    }
    if (!found) { fprintf(stderr, "no token labelled %s among %lu slots\n", token, ns); return 2; }

    CK_SESSION_HANDLE s;
    CALL(C_OpenSession, slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s);
    EXPECT("C_OpenSession", CKR_OK);
    CALL(C_Login, s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    EXPECT("C_Login", CKR_OK);
    priv_key = find_key(s, CKO_PRIVATE_KEY, key);
    pub_key = find_key(s, CKO_PUBLIC_KEY, key);

    pthread_t th[256];
    if (nthreads > 256) nthreads = 256;
    for (int i = 0; i < nthreads; i++)
        if (pthread_create(&th[i], NULL, worker, (void *)(long)i)) { perror("pthread_create"); return 2; }
    for (int i = 0; i < nthreads; i++)
        pthread_join(th[i], NULL);

    CALL(C_Logout, s);
    EXPECT("C_Logout", CKR_OK);
    CALL(C_CloseSession, s);
    EXPECT("C_CloseSession", CKR_OK);
    CALL(C_Finalize, NULL);
    EXPECT("C_Finalize", CKR_OK);
out:
    printf("RESULT mode=%s threads=%d iterations=%d ops=%ld failures=%d "
           "mutexes_created=%ld destroyed=%ld locks=%ld unlocks=%ld\n",
           mode, nthreads, iterations, ops, failures,
           mutex_created, mutex_destroyed, mutex_locked, mutex_unlocked);
    return failures ? 1 : 0;
}
