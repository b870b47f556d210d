//! Profiles as last read, kept in memory so a repeated read skips SQLite and JSON decoding.
//!
//! Safe only because one process owns the file (see `FileLock`) and every write goes through
//! its writer thread, which invalidates what it touched before it answers. A read that raced a
//! commit must not store what it read: the cache's epoch moves on each invalidation, and a
//! reader stores its result only if the epoch is still the one it saw before reading.
//!
//! A read keeps a profile only the second time it misses it within a while (the first time
//! it is noted in `recent_misses`). With uniformly random users over a million profiles,
//! every read used to evict another profile that was never read again, and that churn was
//! 8% of the server's CPU; one-off reads no longer push out profiles read often.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use subgate_core::model::{FastMap, ProfileKey, ProfileState};
use uuid::Uuid;

pub struct ProfileCache {
    capacity: usize,
    /// Bound on the entries' estimated size ([`approx_bytes`]): a profile with thousands of
    /// transactions is one entry but many ordinary ones' memory.
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    epoch: u64,
    by_id: FastMap<Uuid, Entry>,
    /// App, then customer user id, to profile id (nested so a read looks it up by `&str`,
    /// without building a key); checked against the entry on use, so a stale mapping is only a
    /// miss.
    by_customer_user_id: FastMap<Uuid, FastMap<String, Uuid>>,
    /// Insertion order, for evicting the oldest entries first. An id whose stamp no longer
    /// matches its entry was removed or inserted again since, and is skipped.
    order: VecDeque<(Uuid, u64)>,
    next_stamp: u64,
    /// The sum of the entries' `bytes`.
    bytes: usize,
    /// Hashes of profile ids whose read missed, by hash modulo its length (a newer miss
    /// overwrites an older one in its slot).
    recent_misses: Vec<u64>,
}

struct Entry {
    state: Arc<ProfileState>,
    stamp: u64,
    bytes: usize,
}

/// About how much memory a decoded profile holds: its structs and the text they point to.
/// An estimate (allocator overhead and map nodes are guessed), cheap enough for every insert.
/// Vectors count their capacity: a state a write saved pushed onto a clone of the one before,
/// so its transactions' vector is often twice as long as its transactions, and counting only
/// those let a 10k-profile node's cache pass its bound by about half.
fn approx_bytes(state: &ProfileState) -> usize {
    use std::mem::size_of;
    use subgate_core::model::{AttributeValue, Grant, Revoke, Transaction};
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
    let doc = &state.profile.doc;
    // Each transaction sits behind its own `Arc` (two counters before the struct).
    let transactions: usize = state.transactions.capacity() * size_of::<Arc<Transaction>>()
        + state
            .transactions
            .iter()
            .map(|t| {
                2 * size_of::<usize>()
                    + size_of::<Transaction>()
                    + t.store.capacity()
                    + t.store_product_id.capacity()
                    + t.store_transaction_id.capacity()
                    + t.store_original_transaction_id.capacity()
                    + text(&t.store_base_plan_id)
                    + text(&t.cancellation_reason)
                    + text(&t.variation_id)
                    + t.offer.as_ref().map_or(0, |_| 128)
            })
            .sum::<usize>();
    let attributes: usize = doc
        .attributes
        .iter()
        .map(|(key, value)| {
            let value = match value {
                AttributeValue::Text(text) => text.capacity(),
                AttributeValue::Number(_) => 0,
            };
            64 + key.capacity() + value
        })
        .sum();
    let grants: usize = doc.grants.capacity() * size_of::<Grant>()
        + doc
            .grants
            .iter()
            .map(|g| g.access_level_id.capacity() + g.purchase.as_ref().map_or(0, |_| 256))
            .sum::<usize>();
    let meta = doc
        .installation_meta
        .as_ref()
        .map_or(0, |m| m.iter().map(|(k, _)| 96 + k.len()).sum());
    size_of::<ProfileState>()
        + text(&state.profile.customer_user_id)
        + transactions
        + attributes
        + grants
        + doc.revokes.capacity() * size_of::<Revoke>()
        + meta
        + 640
}

/// The epoch a reader saw before it went to the database.
#[derive(Clone, Copy)]
pub struct Epoch(u64);

impl ProfileCache {
    /// A cache of at most `capacity` profiles and about `max_bytes`; 0 keeps nothing.
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        let capacity = if max_bytes == 0 { 0 } else { capacity };
        Self {
            capacity,
            max_bytes,
            inner: Mutex::new(Inner {
                recent_misses: vec![0; Self::miss_slots(capacity)],
                ..Inner::default()
            }),
        }
    }

    /// Four slots per cached profile: a profile read again before about that many other
    /// misses is kept.
    fn miss_slots(capacity: usize) -> usize {
        if capacity == 0 {
            0
        } else {
            capacity.saturating_mul(4).max(1024)
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The maps stay consistent even if a holder panicked: every update is a single insert
        // or remove.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, app_id: Uuid, key: &ProfileKey) -> Option<Arc<ProfileState>> {
        if self.capacity == 0 {
            return None;
        }
        let inner = self.lock();
        let id = match key {
            ProfileKey::Id(id) => *id,
            ProfileKey::CustomerUserId(cuid) => {
                *inner.by_customer_user_id.get(&app_id)?.get(cuid.as_str())?
            }
        };
        let state = &inner.by_id.get(&id)?.state;
        let p = &state.profile;
        let matches = p.app_id == app_id
            && match key {
                ProfileKey::Id(_) => true,
                ProfileKey::CustomerUserId(cuid) => p.customer_user_id.as_ref() == Some(cuid),
            };
        matches.then(|| Arc::clone(state))
    }

    /// To be taken before reading the database.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.lock().epoch)
    }

    /// Stores what a read returned if the same profile missed recently too, unless a write
    /// was committed since `seen`.
    pub fn insert(&self, seen: Epoch, state: &Arc<ProfileState>) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        if inner.epoch == seen.0 && inner.missed_before(state.profile.id) {
            inner.put(self.capacity, self.max_bytes, state);
        }
    }

    /// Stores what was read for a write about to be queued, unless a write was committed since
    /// `seen`: the writer then takes it from here instead of reading and decoding its row, and
    /// keeps the state it saves in its place either way.
    pub fn insert_before_write(&self, seen: Epoch, state: &Arc<ProfileState>) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        if inner.epoch == seen.0 {
            inner.put(self.capacity, self.max_bytes, state);
        }
    }

    /// After a commit: forgets what it touched, then keeps what it saved (the writer knows the
    /// committed state, so the next read or write of it needs no database).
    pub fn committed(&self, touched: &[Uuid], saved: Vec<Arc<ProfileState>>) {
        let mut inner = self.lock();
        inner.epoch += 1;
        for id in touched {
            inner.remove(*id);
        }
        if self.capacity > 0 {
            for state in &saved {
                inner.put(self.capacity, self.max_bytes, state);
            }
        }
    }

    /// Forgets everything, after a bulk change.
    pub fn clear(&self) {
        let mut inner = self.lock();
        let epoch = inner.epoch + 1;
        *inner = Inner {
            epoch,
            recent_misses: vec![0; Self::miss_slots(self.capacity)],
            ..Inner::default()
        };
    }
}

impl Inner {
    /// Whether `id` missed recently; notes this miss otherwise.
    fn missed_before(&mut self, id: Uuid) -> bool {
        let (high, low) = id.as_u64_pair();
        // Never 0, so an empty slot matches nothing.
        let hash = (high ^ low.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let len = self.recent_misses.len() as u64;
        let Some(slot) = hash.checked_rem(len).and_then(|s| usize::try_from(s).ok()) else {
            return false;
        };
        if self.recent_misses[slot] == hash {
            self.recent_misses[slot] = 0;
            true
        } else {
            self.recent_misses[slot] = hash;
            false
        }
    }

    fn put(&mut self, capacity: usize, max_bytes: usize, state: &Arc<ProfileState>) {
        let p = &state.profile;
        self.remove(p.id);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let bytes = approx_bytes(state);
        let entry = Entry {
            state: Arc::clone(state),
            stamp,
            bytes,
        };
        self.bytes += bytes;
        self.by_id.insert(p.id, entry);
        self.order.push_back((p.id, stamp));
        if let Some(cuid) = &p.customer_user_id {
            self.by_customer_user_id
                .entry(p.app_id)
                .or_default()
                .insert(cuid.clone(), p.id);
        }
        while self.by_id.len() > capacity || self.bytes > max_bytes {
            let Some((oldest, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.by_id.get(&oldest).is_some_and(|e| e.stamp == stamp) {
                self.remove(oldest);
            }
        }
        // Skipped ids pile up when profiles are written and read again while the cache is not
        // full; dropping them once they outnumber the live ones keeps this linear in entries.
        if self.order.len() > 2 * self.by_id.len() + 64 {
            let Inner { by_id, order, .. } = self;
            order.retain(|(id, stamp)| by_id.get(id).is_some_and(|e| e.stamp == *stamp));
        }
    }

    fn remove(&mut self, id: Uuid) {
        if let Some(entry) = self.by_id.remove(&id) {
            self.bytes -= entry.bytes;
            let p = &entry.state.profile;
            if let (Some(cuid), Some(ids)) = (
                &p.customer_user_id,
                self.by_customer_user_id.get_mut(&p.app_id),
            ) {
                if ids.get(cuid.as_str()) == Some(&id) {
                    ids.remove(cuid.as_str());
                }
            }
        }
        // `order` keeps the id until it reaches the front or is compacted away: removing from
        // the middle of a queue would cost a scan per write.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use subgate_core::model::{AttributeValue, Profile, Transaction};

    /// Counts the bytes this thread holds, so a test can weigh what it built.
    struct CountingAllocator;

    thread_local! {
        static HELD: Cell<isize> = const { Cell::new(0) };
    }

    fn held_delta(size: usize, sign: isize) {
        let size = isize::try_from(size).unwrap_or(isize::MAX);
        // Unavailable while the thread is being torn down; those bytes are not weighed.
        let _ = HELD.try_with(|held| held.set(held.get() + sign * size));
    }

    unsafe impl GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            held_delta(layout.size(), 1);
            // SAFETY: forwarded as received.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            held_delta(layout.size(), -1);
            // SAFETY: forwarded as received.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: CountingAllocator = CountingAllocator;

    fn held() -> isize {
        HELD.with(Cell::get)
    }

    fn state(app_id: Uuid, cuid: &str) -> Arc<ProfileState> {
        let now = Utc::now();
        Arc::new(ProfileState {
            profile: Profile {
                id: Uuid::now_v7(),
                app_id,
                customer_user_id: Some(cuid.into()),
                version: 1,
                created_at: now,
                updated_at: now,
                doc: Default::default(),
            },
            transactions: Vec::new(),
        })
    }

    /// A profile read twice, which the cache keeps.
    fn read_twice(cache: &ProfileCache, state: &Arc<ProfileState>) {
        cache.insert(cache.epoch(), state);
        cache.insert(cache.epoch(), state);
    }

    #[test]
    fn finds_a_profile_by_either_key() {
        let cache = ProfileCache::new(10, usize::MAX);
        let app = Uuid::now_v7();
        let alice = state(app, "alice");
        read_twice(&cache, &alice);
        let id = alice.profile.id;
        assert!(cache.get(app, &ProfileKey::Id(id)).is_some());
        assert!(cache
            .get(app, &ProfileKey::CustomerUserId("alice".into()))
            .is_some());
        assert!(cache
            .get(Uuid::now_v7(), &ProfileKey::CustomerUserId("alice".into()))
            .is_none());
        cache.committed(&[id], Vec::new());
        assert!(cache.get(app, &ProfileKey::Id(id)).is_none());
        assert!(cache
            .get(app, &ProfileKey::CustomerUserId("alice".into()))
            .is_none());
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_kept() {
        let cache = ProfileCache::new(10, usize::MAX);
        let app = Uuid::now_v7();
        let alice = state(app, "alice");
        // Read once: the next read keeps it, unless a write lands meanwhile.
        cache.insert(cache.epoch(), &alice);
        let seen = cache.epoch();
        cache.committed(&[Uuid::now_v7()], Vec::new());
        cache.insert(seen, &alice);
        assert!(cache.get(app, &ProfileKey::Id(alice.profile.id)).is_none());
    }

    #[test]
    fn a_read_ahead_of_a_write_is_kept_at_once_unless_a_write_raced_it() {
        let cache = ProfileCache::new(10, usize::MAX);
        let app = Uuid::now_v7();
        let alice = state(app, "alice");
        let seen = cache.epoch();
        cache.committed(&[Uuid::now_v7()], Vec::new());
        cache.insert_before_write(seen, &alice);
        assert!(cache.get(app, &ProfileKey::Id(alice.profile.id)).is_none());
        // Its first read: no earlier miss is needed.
        cache.insert_before_write(cache.epoch(), &alice);
        assert!(cache.get(app, &ProfileKey::Id(alice.profile.id)).is_some());
    }

    #[test]
    fn keeps_at_most_its_capacity_evicting_the_oldest() {
        let cache = ProfileCache::new(2, usize::MAX);
        let app = Uuid::now_v7();
        let states: Vec<_> = ["a", "b", "c"].iter().map(|c| state(app, c)).collect();
        for s in &states {
            read_twice(&cache, s);
        }
        let cached = |s: &Arc<ProfileState>| cache.get(app, &ProfileKey::Id(s.profile.id));
        assert!(cached(&states[0]).is_none());
        assert!(cached(&states[1]).is_some());
        assert!(cached(&states[2]).is_some());
        let mappings: usize = cache
            .lock()
            .by_customer_user_id
            .values()
            .map(FastMap::len)
            .sum();
        assert!(mappings <= 2);
    }

    #[test]
    fn a_changed_customer_user_id_is_a_miss() {
        let cache = ProfileCache::new(10, usize::MAX);
        let app = Uuid::now_v7();
        let alice = state(app, "alice");
        read_twice(&cache, &alice);
        let mut renamed = (*alice).clone();
        renamed.profile.customer_user_id = Some("bob".into());
        read_twice(&cache, &Arc::new(renamed));
        assert!(cache
            .get(app, &ProfileKey::CustomerUserId("alice".into()))
            .is_none());
        assert!(cache
            .get(app, &ProfileKey::CustomerUserId("bob".into()))
            .is_some());
    }

    #[test]
    fn rewritten_profiles_do_not_grow_the_eviction_queue() {
        let cache = ProfileCache::new(100, usize::MAX);
        let alice = state(Uuid::now_v7(), "alice");
        for _ in 0..1000 {
            cache.committed(&[alice.profile.id], Vec::new());
            read_twice(&cache, &alice);
        }
        assert_eq!(cache.lock().by_id.len(), 1);
        assert!(cache.lock().order.len() <= 2 + 64);
    }

    /// A stored transaction as the benchmark seeds them, in the JSON rows hold.
    fn stored_transaction(i: usize) -> serde_json::Value {
        serde_json::json!({
            "id": Uuid::now_v7(), "seq": i, "purchase_type": "one_time_purchase", "store": "app_store",
            "environment": "Production", "store_product_id": "com.bench.coins",
            "store_transaction_id": format!("bench-4254374302-54-{i}"),
            "store_original_transaction_id": format!("bench-4254374302-54-{i}"),
            "is_family_shared": false,
            "price": {"country": "US", "currency": "USD", "value_micros": 990_000,
                      "usd_micros": 990_000},
            "purchased_at": "2026-11-22T02:12:50.894927Z",
            "created_at": "2026-11-22T02:12:50.894927Z",
            "updated_at": "2026-11-22T02:12:50.894927Z"
        })
    }

    /// The estimate is what bounds the cache's memory: it must not fall far below what a
    /// profile holds, as read from a row or as a write saved it (a clone with one more
    /// transaction pushed, whose vector then has room for twice as many).
    #[test]
    fn the_size_estimate_is_near_what_a_profile_holds() {
        for transactions in [2, 16, 64] {
            for saved_by_a_write in [false, true] {
                let before = held();
                let mut decoded: Vec<Arc<Transaction>> = (0..transactions)
                    .map(|i| serde_json::from_value(stored_transaction(i)).unwrap())
                    .collect();
                decoded.shrink_to_fit();
                if saved_by_a_write {
                    let mut next = decoded.clone();
                    next.push(serde_json::from_value(stored_transaction(transactions)).unwrap());
                    decoded = next;
                }
                let mut profile = (*state(Uuid::now_v7(), "user-42")).clone();
                profile.profile.doc = serde_json::from_value(serde_json::json!({
                    "attributes": {"plan": "gold", "words_learned": 42, "cohort": "c6"},
                    "grants": [{"id": Uuid::new_v4(), "access_level_id": "pro",
                                "starts_at": "2026-11-22T02:12:46.037736Z",
                                "expires_at": "2026-12-22T02:12:46.037736Z",
                                "created_at": "2026-11-22T02:12:46.037736Z", "seq": 3}]
                }))
                .unwrap();
                profile.transactions = decoded;
                let state = Arc::new(profile);
                let real = usize::try_from(held() - before).unwrap();
                let estimate = approx_bytes(&state);
                let case = format!("{transactions} transactions, saved: {saved_by_a_write}");
                assert!(estimate * 10 >= real * 9, "{case}: {estimate} for {real}");
                assert!(estimate * 10 <= real * 13, "{case}: {estimate} for {real}");
            }
        }
    }

    #[test]
    fn keeps_about_its_byte_budget_whatever_the_count() {
        let app = Uuid::now_v7();
        let small = state(app, "small");
        let mut big = (*state(app, "big")).clone();
        big.profile.doc.attributes = (0..1000)
            .map(|i| (format!("key{i}"), AttributeValue::Text("x".repeat(100))))
            .collect();
        let big = Arc::new(big);
        let budget = approx_bytes(&small) * 3;
        assert!(approx_bytes(&big) > budget);
        let cache = ProfileCache::new(1000, budget);
        read_twice(&cache, &small);
        read_twice(&cache, &big);
        // The big one alone passes the budget: it goes, oldest first, then itself.
        assert!(cache.get(app, &ProfileKey::Id(big.profile.id)).is_none());
        assert!(cache.get(app, &ProfileKey::Id(small.profile.id)).is_none());
        assert_eq!(cache.lock().bytes, 0);
        let others: Vec<_> = (0..10).map(|i| state(app, &format!("u{i}"))).collect();
        for s in &others {
            read_twice(&cache, s);
        }
        assert_eq!(cache.lock().by_id.len(), 3);
        assert!(cache.lock().bytes <= budget);
        assert!(cache
            .get(app, &ProfileKey::Id(others[9].profile.id))
            .is_some());
    }

    #[test]
    fn nothing_is_kept_with_capacity_zero() {
        let cache = ProfileCache::new(0, usize::MAX);
        let alice = state(Uuid::now_v7(), "alice");
        read_twice(&cache, &alice);
        assert!(cache
            .get(alice.profile.app_id, &ProfileKey::Id(alice.profile.id))
            .is_none());
    }

    #[test]
    fn a_profile_read_once_is_not_kept_and_does_not_push_out_one_read_often() {
        let cache = ProfileCache::new(4, usize::MAX);
        let app = Uuid::now_v7();
        let hot = state(app, "hot");
        read_twice(&cache, &hot);
        for i in 0..1000 {
            let once = state(app, &format!("once-{i}"));
            cache.insert(cache.epoch(), &once);
            assert!(cache.get(app, &ProfileKey::Id(once.profile.id)).is_none());
        }
        assert!(cache.get(app, &ProfileKey::Id(hot.profile.id)).is_some());
    }
}
