//! SQLite's own page cache, with the one key it misuses moved out of its way.
//!
//! When SQLite rebalances a b-tree it may swap two sibling pages, and it parks one of them for
//! the swap under the number of the file's lock-byte page (the page at 1 GiB: 262,145 with
//! 4 KiB pages), which no table ever uses. The default page cache remembers that as the
//! largest page number it has held. Ending the transaction, SQLite drops cached pages past
//! the end of the file; with that number so far past the end, the cache walks every slot of
//! its hash table instead of the few past the end. Below 1 GiB, each commit with such a swap
//! walked the writer's whole cache: about 9 µs of the writer's CPU a write at 10,000 profiles
//! (session 24: 7.5% of its time, the writer thread being what bounds writes/s).
//!
//! This wraps the default cache and files a page kept under the lock-byte page's number under
//! key 0 instead, a number SQLite never uses for a page. Every method sees the same mapping,
//! so lookups, moves and drops stay consistent, and the largest key never jumps. A page is
//! only ever under that number between two moves of one swap (SQLite refuses to read the
//! lock-byte page itself, and drops the page it made for it), so no truncation finds one
//! there.
//!
//! It must be installed before SQLite initializes, that is before the process opens its first
//! connection; [`install`] is called by every connection this crate opens, and does nothing
//! once SQLite has initialized without it (a process that opened a connection some other way
//! first keeps the default cache, which is only slower).

use rusqlite::ffi;
use std::os::raw::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};

/// Where SQLite's locks live: the file offset of its lock-byte page (`PENDING_BYTE`).
const LOCK_BYTE_OFFSET: u32 = 0x4000_0000;

/// Stands in for the lock-byte page's number: page numbers start at 1.
const PARKED_KEY: c_uint = 0;

/// The default cache's methods, as SQLite gave them.
struct DefaultMethods(ffi::sqlite3_pcache_methods2);

// SAFETY: the methods are plain function pointers and the default cache's `pArg` (null for
// SQLite's own cache); they are written once, before SQLite starts, and only read after.
unsafe impl Send for DefaultMethods {}
unsafe impl Sync for DefaultMethods {}

static DEFAULT: OnceLock<DefaultMethods> = OnceLock::new();
static INSTALL: Once = Once::new();

/// Set once SQLite has taken the wrapper as its page cache.
static IN_USE: AtomicBool = AtomicBool::new(false);

/// Whether SQLite took the wrapper: false when something initialized SQLite before
/// [`install`] ran, which leaves the default cache (correct, only slower).
pub fn in_use() -> bool {
    IN_USE.load(Ordering::Relaxed)
}

/// Counts the pages filed under [`PARKED_KEY`], so that tests can see the path taken.
#[cfg(test)]
pub static PARKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One cache: the default cache's, and its page size's lock-byte page number.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    lock_page: c_uint,
}

/// Installs the wrapper, once per process, if SQLite has not initialized yet.
pub fn install() {
    INSTALL.call_once(|| {
        let mut default = ffi::sqlite3_pcache_methods2 {
            iVersion: 0,
            pArg: std::ptr::null_mut(),
            xInit: None,
            xShutdown: None,
            xCreate: None,
            xCachesize: None,
            xPagecount: None,
            xFetch: None,
            xUnpin: None,
            xRekey: None,
            xTruncate: None,
            xDestroy: None,
            xShrink: None,
        };
        // SAFETY: GETPCACHE2 writes the current methods into the struct it is given.
        let got = unsafe {
            ffi::sqlite3_config(
                ffi::SQLITE_CONFIG_GETPCACHE2,
                &mut default as *mut ffi::sqlite3_pcache_methods2,
            )
        };
        if got != ffi::SQLITE_OK
            || default.xCreate.is_none()
            || DEFAULT.set(DefaultMethods(default)).is_err()
        {
            tracing::debug!(code = got, "SQLite's page cache is left as it is");
            return;
        }
        let wrapper = ffi::sqlite3_pcache_methods2 {
            iVersion: 1,
            pArg: std::ptr::null_mut(),
            xInit: Some(init),
            xShutdown: Some(shutdown),
            xCreate: Some(create),
            xCachesize: Some(cachesize),
            xPagecount: Some(pagecount),
            xFetch: Some(fetch),
            xUnpin: Some(unpin),
            xRekey: Some(rekey),
            xTruncate: Some(truncate),
            xDestroy: Some(destroy),
            xShrink: Some(shrink),
        };
        // SAFETY: SQLite copies the struct; it refuses (SQLITE_MISUSE) once initialized.
        let set = unsafe {
            ffi::sqlite3_config(
                ffi::SQLITE_CONFIG_PCACHE2,
                &wrapper as *const ffi::sqlite3_pcache_methods2,
            )
        };
        if set == ffi::SQLITE_OK {
            IN_USE.store(true, Ordering::Relaxed);
        } else {
            tracing::debug!(
                code = set,
                "SQLite had started: its page cache is left as it is"
            );
        }
    });
}

fn methods() -> Option<&'static ffi::sqlite3_pcache_methods2> {
    DEFAULT.get().map(|d| &d.0)
}

/// The default cache of a [`Cache`] made by [`create`].
///
/// # Safety
/// `cache` must come from [`create`] and not be destroyed yet.
unsafe fn inner(cache: *mut ffi::sqlite3_pcache) -> *mut ffi::sqlite3_pcache {
    // SAFETY: per the contract, `cache` points to a live `Cache`.
    unsafe { (*(cache as *const Cache)).inner }
}

/// [`inner`], and `key` as the default cache files it.
///
/// # Safety
/// As for [`inner`].
unsafe fn filed(
    cache: *mut ffi::sqlite3_pcache,
    key: c_uint,
) -> (*mut ffi::sqlite3_pcache, c_uint) {
    // SAFETY: per the contract, `cache` points to a live `Cache`.
    let cache = unsafe { &*(cache as *const Cache) };
    if key == cache.lock_page {
        #[cfg(test)]
        PARKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (cache.inner, PARKED_KEY)
    } else {
        (cache.inner, key)
    }
}

unsafe extern "C" fn init(_: *mut c_void) -> c_int {
    match methods() {
        // SAFETY: the default cache's own method, with its own argument.
        Some(m) => m.xInit.map_or(ffi::SQLITE_OK, |f| unsafe { f(m.pArg) }),
        None => ffi::SQLITE_ERROR,
    }
}

unsafe extern "C" fn shutdown(_: *mut c_void) {
    if let Some(f) = methods().and_then(|m| m.xShutdown.map(|f| (f, m.pArg))) {
        // SAFETY: as in `init`.
        unsafe { (f.0)(f.1) }
    }
}

unsafe extern "C" fn create(
    page_size: c_int,
    extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let Some(create) = methods().and_then(|m| m.xCreate) else {
        return std::ptr::null_mut();
    };
    // SAFETY: the default cache's constructor, with SQLite's arguments.
    let inner = unsafe { create(page_size, extra, purgeable) };
    if inner.is_null() {
        return inner;
    }
    // SQLite's page sizes are powers of two from 512 to 65,536; with no size, no key is the
    // lock-byte page's (the largest number is never a page: the largest page count is one less).
    let lock_page = u32::try_from(page_size)
        .ok()
        .filter(|&size| size > 0)
        .map_or(c_uint::MAX, |size| LOCK_BYTE_OFFSET / size + 1);
    Box::into_raw(Box::new(Cache { inner, lock_page })) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn cachesize(cache: *mut ffi::sqlite3_pcache, pages: c_int) {
    if let Some(f) = methods().and_then(|m| m.xCachesize) {
        // SAFETY: `cache` is one of ours (SQLite hands back what `create` returned).
        unsafe { f(inner(cache), pages) }
    }
}

unsafe extern "C" fn pagecount(cache: *mut ffi::sqlite3_pcache) -> c_int {
    match methods().and_then(|m| m.xPagecount) {
        // SAFETY: as in `cachesize`.
        Some(f) => unsafe { f(inner(cache)) },
        None => 0,
    }
}

unsafe extern "C" fn fetch(
    cache: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    match methods().and_then(|m| m.xFetch) {
        Some(f) => {
            // SAFETY: as in `cachesize`.
            let (inner, key) = unsafe { filed(cache, key) };
            unsafe { f(inner, key, create) }
        }
        None => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn unpin(
    cache: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    if let Some(f) = methods().and_then(|m| m.xUnpin) {
        // SAFETY: as in `cachesize`; the page is the default cache's own.
        unsafe { f(inner(cache), page, discard) }
    }
}

unsafe extern "C" fn rekey(
    cache: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    if let Some(f) = methods().and_then(|m| m.xRekey) {
        // SAFETY: as in `unpin`.
        let (inner, old) = unsafe { filed(cache, old) };
        let (_, new) = unsafe { filed(cache, new) };
        unsafe { f(inner, page, old, new) }
    }
}

unsafe extern "C" fn truncate(cache: *mut ffi::sqlite3_pcache, limit: c_uint) {
    if let Some(f) = methods().and_then(|m| m.xTruncate) {
        // SAFETY: as in `cachesize`. Only a truncation to 0 (a cleared cache) drops key 0,
        // and no page sits there between swaps.
        unsafe { f(inner(cache), limit) }
    }
}

unsafe extern "C" fn destroy(cache: *mut ffi::sqlite3_pcache) {
    // SAFETY: `cache` came from `create`'s `Box::into_raw`, and SQLite destroys it once.
    let cache = unsafe { Box::from_raw(cache as *mut Cache) };
    if let Some(f) = methods().and_then(|m| m.xDestroy) {
        unsafe { f(cache.inner) }
    }
}

unsafe extern "C" fn shrink(cache: *mut ffi::sqlite3_pcache) {
    if let Some(f) = methods().and_then(|m| m.xShrink) {
        // SAFETY: as in `cachesize`.
        unsafe { f(inner(cache)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Random inserts, growths and deletes make SQLite rebalance with swaps, which park pages
    /// under key 0; the file must read back whole, as a map kept beside it says.
    #[test]
    fn pages_swapped_through_the_lock_page_number_leave_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::open_connection(&dir.path().join("t.db")).unwrap();
        assert!(DEFAULT.get().is_some(), "the wrapper was not installed");
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
            .unwrap();
        let parked_before = PARKED.load(Ordering::Relaxed);
        let mut model = BTreeMap::new();
        // A fixed linear congruential sequence: the same workload every run.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            seed >> 33
        };
        for _ in 0..40 {
            let tx = conn.transaction().unwrap();
            for _ in 0..200 {
                let key = (next() % 5_000) as i64;
                if next() % 5 == 0 {
                    tx.execute("DELETE FROM t WHERE k = ?1", [key]).unwrap();
                    model.remove(&key);
                } else {
                    let value = vec![(key % 251) as u8; 50 + (next() % 1_500) as usize];
                    tx.execute(
                        "INSERT INTO t (k, v) VALUES (?1, ?2)
                         ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                        rusqlite::params![key, value],
                    )
                    .unwrap();
                    model.insert(key, value);
                }
            }
            tx.commit().unwrap();
        }
        assert!(
            PARKED.load(Ordering::Relaxed) > parked_before,
            "no swap was parked"
        );
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let mut stmt = conn.prepare("SELECT k, v FROM t ORDER BY k").unwrap();
        let stored: BTreeMap<i64, Vec<u8>> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(stored, model);
    }
}
