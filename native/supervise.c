/* Included into the stub by native/build_stub.py (after the PKCS#11 types). */
/* ---- supervised member calls: a pool of worker threads ---------------------
   The engine hands each member call to a worker and waits with a deadline, so a
   call stuck in a hung member can be abandoned (the worker stays behind, the
   application's thread goes on). No Python on the workers, no GIL in the hand-off. */
typedef CK_RV (*hashim_fn9)(CK_ULONG, CK_ULONG, CK_ULONG, CK_ULONG, CK_ULONG,
                            CK_ULONG, CK_ULONG, CK_ULONG, CK_ULONG);
struct hashim_job {
    hashim_fn9 fn; CK_ULONG a[9]; CK_RV rv;
    int done, abandoned;
    pthread_cond_t cv;
    struct hashim_job *next;
};
static pthread_mutex_t hashim_pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hashim_pool_cv = PTHREAD_COND_INITIALIZER;
static struct hashim_job *hashim_pool_head, *hashim_pool_tail;
static int hashim_pool_idle, hashim_pool_threads;
#define HASHIM_POOL_MAX 512

static void *hashim_worker(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&hashim_pool_mu);
    for (;;) {
        while (!hashim_pool_head) {
            hashim_pool_idle++;
            pthread_cond_wait(&hashim_pool_cv, &hashim_pool_mu);
            hashim_pool_idle--;
        }
        struct hashim_job *j = hashim_pool_head;
        hashim_pool_head = j->next;
        if (!hashim_pool_head) hashim_pool_tail = NULL;
        pthread_mutex_unlock(&hashim_pool_mu);
        CK_RV rv = j->fn(j->a[0], j->a[1], j->a[2], j->a[3], j->a[4], j->a[5], j->a[6],
                         j->a[7], j->a[8]);
        pthread_mutex_lock(&hashim_pool_mu);
        j->rv = rv;
        j->done = 1;
        if (j->abandoned) {
            pthread_cond_destroy(&j->cv);
            free(j);
        } else {
            pthread_cond_signal(&j->cv);
        }
    }
    return NULL;
}

static void hashim_pool_after_fork_child(void)
{
    /* the workers are the parent's: the child starts with none */
    pthread_mutex_init(&hashim_pool_mu, NULL);
    pthread_cond_init(&hashim_pool_cv, NULL);
    hashim_pool_head = hashim_pool_tail = NULL;
    hashim_pool_idle = hashim_pool_threads = 0;
}

__attribute__((constructor)) static void hashim_pool_init(void)
{
    pthread_atfork(NULL, NULL, hashim_pool_after_fork_child);
}

/* Start fn(args[0..8]) on a worker; wait up to `seconds`. Returns 1 when it finished
   (*rv set, job gone), 0 when still running (*job to hashim_wait/hashim_abandon),
   -1 when no worker could be had. */
static int hashim_wait_locked(struct hashim_job *j, double seconds, CK_RV *rv)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long ns = ts.tv_nsec + (long)((seconds - (long)seconds) * 1e9);
    ts.tv_sec += (long)seconds + ns / 1000000000L;
    ts.tv_nsec = ns % 1000000000L;
    while (!j->done) {
        if (pthread_cond_timedwait(&j->cv, &hashim_pool_mu, &ts) != 0 && !j->done)
            return 0;
    }
    *rv = j->rv;
    pthread_cond_destroy(&j->cv);
    free(j);
    return 1;
}

static int hashim_call(void *fn, CK_ULONG *args, double seconds, CK_RV *rv, void **job)
{
    struct hashim_job *j = calloc(1, sizeof(*j));
    if (!j) return -1;
    j->fn = (hashim_fn9)fn;
    memcpy(j->a, args, sizeof(j->a));
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_cond_init(&j->cv, &attr);
    pthread_condattr_destroy(&attr);
    pthread_mutex_lock(&hashim_pool_mu);
    if (hashim_pool_idle == 0) {
        pthread_t t;
        pthread_attr_t ta;
        pthread_attr_init(&ta);
        pthread_attr_setdetachstate(&ta, PTHREAD_CREATE_DETACHED);
        if (hashim_pool_threads >= HASHIM_POOL_MAX
                || pthread_create(&t, &ta, hashim_worker, NULL) != 0) {
            pthread_attr_destroy(&ta);
            pthread_mutex_unlock(&hashim_pool_mu);
            pthread_cond_destroy(&j->cv);
            free(j);
            return -1;
        }
        pthread_attr_destroy(&ta);
        hashim_pool_threads++;
    }
    if (hashim_pool_tail) hashim_pool_tail->next = j; else hashim_pool_head = j;
    hashim_pool_tail = j;
    pthread_cond_signal(&hashim_pool_cv);
    int done = hashim_wait_locked(j, seconds, rv);
    pthread_mutex_unlock(&hashim_pool_mu);
    if (!done) *job = j;
    return done;
}

static int hashim_wait(void *job, double seconds, CK_RV *rv)
{
    pthread_mutex_lock(&hashim_pool_mu);
    int done = hashim_wait_locked((struct hashim_job *)job, seconds, rv);
    pthread_mutex_unlock(&hashim_pool_mu);
    return done;
}

static void hashim_abandon(void *job)
{
    struct hashim_job *j = job;
    pthread_mutex_lock(&hashim_pool_mu);
    if (j->done) {
        pthread_cond_destroy(&j->cv);
        free(j);
    } else {
        j->abandoned = 1;
    }
    pthread_mutex_unlock(&hashim_pool_mu);
}

static int hashim_pool_size(void) { return hashim_pool_threads; }

