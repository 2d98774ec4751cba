/* Included into the stub by native/build_stub.py (after the PKCS#11 types).

   The C fast path: once the engine (Python) has started an operation on a member, it
   publishes a route (member function list + member session) for that virtual session
   and operation kind; the generated wrappers of shim/spec/fastpath.py's functions then
   call the member directly, without the GIL. The engine reads back what happened
   (operation ended, became multi-part; calls in flight and served per member). */
#define HASHIM_ROUTES 4096                 /* power of two */
#define HASHIM_MEMBERS 64
#define HASHIM_R_NONE 0
#define HASHIM_R_ACTIVE 1
#define HASHIM_R_MULTIPART 2
#define HASHIM_R_ENDED 3
#define HASHIM_R_DROPPED 4             /* member went down: the engine takes over */
#define HASHIM_R_DROPPED_MULTIPART 5
#define HASHIM_R_EXPIRED 6             /* ended; the next start goes through the engine */

#define HASHIM_ALTS 8
struct hashim_alt {                        /* a member the operation may start on */
    CK_FUNCTION_LIST *fl;
    CK_SESSION_HANDLE mh;
    CK_OBJECT_HANDLE mkey;
    int member;
};
struct hashim_route {
    CK_FUNCTION_LIST *fl;
    CK_SESSION_HANDLE mh;
    int member;
    int state;
    int nalt;
    int stale;                             /* chosen before a member joined */
    struct hashim_alt alt[HASHIM_ALTS];
    /* how the operation was started, for starting it again (see INIT_FAST) */
    int reinit;
    CK_MECHANISM_TYPE mech;
    CK_ULONG plen;
    CK_OBJECT_HANDLE vkey, mkey;
    unsigned char param[HASHIM_INIT_PARAM_MAX];
};
struct hashim_entry {
    CK_SESSION_HANDLE vh;                  /* 0: free */
    CK_FLAGS flags;                        /* the session's flags (HA slot sessions) */
    int ha;                                /* a session on the HA slot */
    struct hashim_route r[HASHIM_KINDS];
};
static struct hashim_entry hashim_routes[HASHIM_ROUTES];
static int hashim_member_up[HASHIM_MEMBERS];
static long hashim_inflight[HASHIM_MEMBERS];
static unsigned long hashim_served[HASHIM_MEMBERS];
static long long hashim_last_done[HASHIM_MEMBERS];

static long long hashim_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline struct hashim_entry *hashim_entry_of(CK_SESSION_HANDLE vh)
{
    return &hashim_routes[vh & (HASHIM_ROUTES - 1)];
}

static inline int hashim_route_get(CK_SESSION_HANDLE vh, int kind, struct hashim_route *out)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) != vh || vh == 0)
        return 0;
    int st = __atomic_load_n(&e->r[kind].state, __ATOMIC_ACQUIRE);
    if (st != HASHIM_R_ACTIVE && st != HASHIM_R_MULTIPART)
        return 0;
    out->fl = e->r[kind].fl;
    out->mh = e->r[kind].mh;
    out->member = e->r[kind].member;
    out->state = st;
    return __atomic_load_n(&hashim_member_up[out->member], __ATOMIC_ACQUIRE);
}

static unsigned hashim_rotation;

/* The least busy member among the route's alternatives (ties rotate), or -1. */
static inline int hashim_pick_alt(struct hashim_route *r)
{
    int n = r->nalt, i, best = -1;
    long best_load = 0;
    if (n <= 0) return -1;
    unsigned start = __atomic_fetch_add(&hashim_rotation, 1, __ATOMIC_RELAXED);
    for (i = 0; i < n; i++) {
        int j = (int)((start + (unsigned)i) % (unsigned)n);
        int mb = r->alt[j].member;
        if (!__atomic_load_n(&hashim_member_up[mb], __ATOMIC_ACQUIRE))
            continue;
        long load = __atomic_load_n(&hashim_inflight[mb], __ATOMIC_RELAXED);
        if (best < 0 || load < best_load) {
            best = j;
            best_load = load;
        }
    }
    return best;
}

/* The least busy alternative, as a route to call: 1, or 0 when none is up. */
static inline int hashim_take_alt(struct hashim_route *r, struct hashim_route *out)
{
    int j = hashim_pick_alt(r);
    if (j < 0) return 0;
    out->fl = r->alt[j].fl;
    out->mh = r->alt[j].mh;
    out->member = r->alt[j].member;
    out->mkey = r->alt[j].mkey;
    out->state = HASHIM_R_ACTIVE;
    return 1;
}

/* A command with no operation state (C_GenerateRandom, C_SeedRandom): on the least
   busy of the session's members. */
static inline int hashim_route_pick(CK_SESSION_HANDLE vh, int kind, struct hashim_route *out)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) != vh || vh == 0)
        return 0;
    struct hashim_route *r = &e->r[kind];
    if (__atomic_load_n(&r->state, __ATOMIC_ACQUIRE) != HASHIM_R_ACTIVE
            || __atomic_load_n(&r->stale, __ATOMIC_ACQUIRE))
        return 0;
    return hashim_take_alt(r, out);
}

/* The application starts again the operation that just ended in the fast path, the
   same way: the route to use, on the least busy member that can (its state is
   ENDED), else 0. */
static inline int hashim_reinit_get(CK_SESSION_HANDLE vh, int kind, CK_MECHANISM *m,
                                    CK_OBJECT_HANDLE key, struct hashim_route *out)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (!m || __atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) != vh || vh == 0)
        return 0;
    struct hashim_route *r = &e->r[kind];
    if (__atomic_load_n(&r->state, __ATOMIC_ACQUIRE) != HASHIM_R_ENDED || !r->reinit
            || r->mech != m->mechanism || r->plen != m->ulParameterLen || r->vkey != key)
        return 0;
    if (r->plen && (!m->pParameter || memcmp(r->param, m->pParameter, r->plen) != 0))
        return 0;
    return hashim_take_alt(r, out);
}

/* the operation now runs on ``chosen`` (after a successful re-init) */
static inline void hashim_route_rebind(CK_SESSION_HANDLE vh, int kind, struct hashim_route *chosen)
{
    struct hashim_route *r = &hashim_entry_of(vh)->r[kind];
    r->fl = chosen->fl;
    r->mh = chosen->mh;
    r->member = chosen->member;
    __atomic_store_n(&r->state, HASHIM_R_ACTIVE, __ATOMIC_RELEASE);
}

static inline void hashim_route_mark(CK_SESSION_HANDLE vh, int kind, int state)
{
    struct hashim_route *r = &hashim_entry_of(vh)->r[kind];
    if (state == HASHIM_R_ENDED && __atomic_load_n(&r->stale, __ATOMIC_ACQUIRE))
        state = HASHIM_R_EXPIRED;          /* the next start is the engine's to place */
    __atomic_store_n(&r->state, state, __ATOMIC_RELEASE);
}

static inline void hashim_fast_begin(struct hashim_route *r)
{
    __atomic_add_fetch(&hashim_inflight[r->member], 1, __ATOMIC_RELAXED);
}

static inline void hashim_fast_end(struct hashim_route *r)
{
    __atomic_sub_fetch(&hashim_inflight[r->member], 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&hashim_served[r->member], 1, __ATOMIC_RELAXED);
    __atomic_store_n(&hashim_last_done[r->member], hashim_now_ns(), __ATOMIC_RELAXED);
}

/* ---- for the engine --------------------------------------------------------- */
static int hashim_route_claim(CK_SESSION_HANDLE vh)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    CK_SESSION_HANDLE free_ = 0;
    if (vh == 0) return 0;
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) == vh) return 1;
    memset(e->r, 0, sizeof(e->r));
    e->ha = 0;
    return __atomic_compare_exchange_n(&e->vh, &free_, vh, 0, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}

/* C_GetSessionInfo of an HA slot session, answered by the stub: the state is the
   group's login (published by the engine) and the session's flags. */
static CK_SLOT_ID hashim_ha_slot;
static volatile int hashim_login = -1;     /* -1 public, else CKU_USER / CKU_SO */

static void hashim_session_publish(CK_SESSION_HANDLE vh, CK_FLAGS flags, CK_SLOT_ID slot)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) != vh) return;
    e->flags = flags;
    hashim_ha_slot = slot;
    __atomic_store_n(&e->ha, 1, __ATOMIC_RELEASE);
}

static void hashim_login_publish(int user)
{
    __atomic_store_n(&hashim_login, user, __ATOMIC_RELEASE);
}

static inline int hashim_session_info(CK_SESSION_HANDLE vh, CK_SESSION_INFO *info)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (!info || vh == 0 || __atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) != vh
            || !__atomic_load_n(&e->ha, __ATOMIC_ACQUIRE))
        return 0;
    int login = __atomic_load_n(&hashim_login, __ATOMIC_ACQUIRE);
    int rw = (e->flags & 2) != 0;          /* CKF_RW_SESSION */
    info->slotID = hashim_ha_slot;
    info->flags = e->flags;
    info->ulDeviceError = 0;
    /* CKS_RO_PUBLIC_SESSION 0, RO_USER 1, RW_PUBLIC 2, RW_USER 3, RW_SO 4 */
    info->state = login == 0 ? (rw ? 4 : 0) : login == 1 ? (rw ? 3 : 1) : (rw ? 2 : 0);
    return 1;
}

static void hashim_route_release(CK_SESSION_HANDLE vh)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) == vh) {
        int k;
        for (k = 0; k < HASHIM_KINDS; k++)
            __atomic_store_n(&e->r[k].state, HASHIM_R_NONE, __ATOMIC_RELEASE);
        __atomic_store_n(&e->ha, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&e->vh, 0, __ATOMIC_RELEASE);
    }
}

static void hashim_route_set(CK_SESSION_HANDLE vh, int kind, void *fl, CK_SESSION_HANDLE mh,
                             int member)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) != vh || member < 0
            || member >= HASHIM_MEMBERS)
        return;
    __atomic_store_n(&e->r[kind].state, HASHIM_R_NONE, __ATOMIC_RELEASE);
    e->r[kind].fl = (CK_FUNCTION_LIST *)fl;
    e->r[kind].mh = mh;
    e->r[kind].member = member;
    e->r[kind].reinit = 0;
    e->r[kind].nalt = 0;
    e->r[kind].stale = 0;
    __atomic_store_n(&e->r[kind].state, HASHIM_R_ACTIVE, __ATOMIC_RELEASE);
}

/* where the operation may start again (after hashim_route_set) */
static void hashim_route_alternatives(CK_SESSION_HANDLE vh, int kind, int n, int *members,
                                      void **fls, CK_SESSION_HANDLE *mhs,
                                      CK_OBJECT_HANDLE *mkeys)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    int i;
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) != vh)
        return;
    struct hashim_route *r = &e->r[kind];
    if (n > HASHIM_ALTS) n = HASHIM_ALTS;
    for (i = 0; i < n; i++) {
        r->alt[i].fl = (CK_FUNCTION_LIST *)fls[i];
        r->alt[i].mh = mhs[i];
        r->alt[i].mkey = mkeys[i];
        r->alt[i].member = members[i];
    }
    r->nalt = n;
}

static int hashim_route_member(CK_SESSION_HANDLE vh, int kind)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) != vh) return -1;
    return e->r[kind].member;
}

/* how the active operation was started (call after hashim_route_set) */
static void hashim_route_set_init(CK_SESSION_HANDLE vh, int kind, CK_MECHANISM_TYPE mech,
                                  const unsigned char *param, CK_ULONG plen,
                                  CK_OBJECT_HANDLE vkey, CK_OBJECT_HANDLE mkey)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) != vh || plen > HASHIM_INIT_PARAM_MAX)
        return;
    struct hashim_route *r = &e->r[kind];
    r->mech = mech;
    r->plen = plen;
    if (plen) memcpy(r->param, param, plen);
    r->vkey = vkey;
    r->mkey = mkey;
    r->reinit = 1;
}

static int hashim_route_state(CK_SESSION_HANDLE vh, int kind)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) != vh) return -1;
    return __atomic_load_n(&e->r[kind].state, __ATOMIC_ACQUIRE);
}

static void hashim_route_end(CK_SESSION_HANDLE vh, int kind)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) == vh)
        __atomic_store_n(&e->r[kind].state, HASHIM_R_NONE, __ATOMIC_RELEASE);
}

static void hashim_route_multipart(CK_SESSION_HANDLE vh, int kind)
{
    struct hashim_entry *e = hashim_entry_of(vh);
    if (__atomic_load_n(&e->vh, __ATOMIC_ACQUIRE) == vh
            && __atomic_load_n(&e->r[kind].state, __ATOMIC_ACQUIRE) == HASHIM_R_ACTIVE)
        __atomic_store_n(&e->r[kind].state, HASHIM_R_MULTIPART, __ATOMIC_RELEASE);
}

static void hashim_member_set_up(int member, int up)
{
    int i, k;
    if (member < 0 || member >= HASHIM_MEMBERS)
        return;
    __atomic_store_n(&hashim_member_up[member], up, __ATOMIC_RELEASE);
    if (up)
        return;
    /* a member that went down loses its sessions: no route may lead there again
       (after a restart the same session handles may belong to other sessions) */
    for (i = 0; i < HASHIM_ROUTES; i++) {
        if (!__atomic_load_n(&hashim_routes[i].vh, __ATOMIC_ACQUIRE))
            continue;
        for (k = 0; k < HASHIM_KINDS; k++) {
            struct hashim_route *r = &hashim_routes[i].r[k];
            int st = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
            if (r->member != member)
                continue;
            /* keep what the engine must know: was the operation multi-part? */
            __atomic_store_n(&r->state, st == HASHIM_R_MULTIPART ? HASHIM_R_DROPPED_MULTIPART
                             : st == HASHIM_R_ACTIVE ? HASHIM_R_DROPPED
                             : st == HASHIM_R_ENDED ? HASHIM_R_EXPIRED : st,
                             __ATOMIC_RELEASE);
        }
    }
}

/* calls in flight, served, and nanoseconds since the last completion */
static void hashim_member_stats(int member, long *inflight, unsigned long *served,
                                long long *idle_ns)
{
    if (member < 0 || member >= HASHIM_MEMBERS) return;
    *inflight = __atomic_load_n(&hashim_inflight[member], __ATOMIC_RELAXED);
    *served = __atomic_load_n(&hashim_served[member], __ATOMIC_RELAXED);
    long long last = __atomic_load_n(&hashim_last_done[member], __ATOMIC_RELAXED);
    *idle_ns = last ? hashim_now_ns() - last : -1;
}

/* A member came (back) into rotation: routes chosen without it are let go, so that
   the next operation of every session is scheduled by the engine again. */
static void hashim_routes_expire(void)
{
    int i, k;
    for (i = 0; i < HASHIM_ROUTES; i++) {
        if (!__atomic_load_n(&hashim_routes[i].vh, __ATOMIC_ACQUIRE))
            continue;
        for (k = 0; k < HASHIM_KINDS; k++) {
            struct hashim_route *r = &hashim_routes[i].r[k];
            int expected = HASHIM_R_ENDED;
            __atomic_store_n(&r->stale, 1, __ATOMIC_RELEASE);
            __atomic_compare_exchange_n(&r->state, &expected, HASHIM_R_EXPIRED, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        }
    }
}

static long hashim_member_inflight(int member)
{
    if (member < 0 || member >= HASHIM_MEMBERS) return 0;
    return __atomic_load_n(&hashim_inflight[member], __ATOMIC_RELAXED);
}

static void hashim_routes_reset(void)
{
    hashim_login = -1;
    memset(hashim_routes, 0, sizeof(hashim_routes));
    memset(hashim_member_up, 0, sizeof(hashim_member_up));
    memset(hashim_inflight, 0, sizeof(hashim_inflight));
    memset(hashim_served, 0, sizeof(hashim_served));
    memset(hashim_last_done, 0, sizeof(hashim_last_done));
}

__attribute__((constructor)) static void hashim_routes_init(void)
{
    pthread_atfork(NULL, NULL, hashim_routes_reset);
}
