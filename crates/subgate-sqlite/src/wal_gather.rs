//! The writer's WAL writes, gathered into a few large `pwrite`s a commit (ADR 0016).
//!
//! SQLite writes each WAL frame with two calls, its 24-byte header and then its page. A commit
//! of a group of writes changes about five pages a write (docs/bench/FINDINGS.md, session 29),
//! so it made ten `pwrite`s a write, and each page, 24 bytes off the kernel's page boundaries,
//! went through the file system's per-page work three times (its header's page and the two its
//! data straddles). This VFS wraps the default one and, for WAL files only, keeps writes that
//! continue one another in a buffer, written with one call before anything else touches the
//! file: a sync (every commit's), a read or a write elsewhere, a truncation, a size query, any
//! other file control, a close, or the buffer growing past [`MAX_GATHERED`].
//!
//! Safe only where every commit syncs the WAL. Other connections see a commit once SQLite
//! publishes it in the WAL index, which it does right after the commit's writes and sync,
//! without another call on the WAL file. Under `synchronous = FULL` that sync writes the
//! buffer out first; under `NORMAL` there would be no sync, and readers would look for the
//! commit's frames in the file while they were still here. [`open_writer`] checks the setting.
//!
//! The buffer sits after the default VFS's own file structure, in the space SQLite allocates
//! for each open file (`szOsFile`), and a WAL file's methods are swapped for this module's,
//! which call the default ones on the same structure. SQLite's unix methods never look at the
//! methods pointer of the file they are given (only its macOS proxy locking does).

use rusqlite::ffi;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
#[cfg(test)]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The name connections open this VFS by.
pub const NAME: &CStr = c"subgate-wal-gather";

/// Past this many gathered bytes the buffer is written out without waiting for the sync, so
/// that a large transaction does not hold its whole log in memory.
const MAX_GATHERED: usize = 4 << 20;

/// The most one call of the default method writes: the unix VFS masks a write's length with
/// 0x1ffff (so a longer one comes out short, and fails). 120 KiB, thirty pages.
const MAX_CALL: usize = 120 << 10;

/// What this module keeps for a WAL file, after the default VFS's structure.
struct Gathered {
    /// The default VFS's methods for this file.
    methods: *const ffi::sqlite3_io_methods,
    /// Where `bytes` go in the file.
    start: i64,
    bytes: Vec<u8>,
}

/// Where [`Gathered`] starts in a file's allocation: after the default VFS's structure.
static GATHERED_OFFSET: OnceLock<usize> = OnceLock::new();

/// The registration's outcome: SQLite's result code.
static REGISTERED: OnceLock<c_int> = OnceLock::new();

/// Counts the buffers written out and the writes gathered into them, so that tests can see
/// the gathering happen.
#[cfg(test)]
pub static WRITTEN_OUT: AtomicU64 = AtomicU64::new(0);
#[cfg(test)]
pub static GATHERED: AtomicU64 = AtomicU64::new(0);

/// Registers the VFS (not as the default), once per process. Looking up the default VFS
/// initializes SQLite, after which `page_cache::install` can no longer take effect: so it
/// runs first, here.
pub fn register() -> Result<(), String> {
    crate::page_cache::install();
    let rc = *REGISTERED.get_or_init(|| {
        // SAFETY: `sqlite3_vfs_find(NULL)` returns the default VFS, which lives as long as the
        // process; its fields are copied, and the copy is leaked, as SQLite keeps a registered
        // VFS's pointer for good.
        unsafe {
            let default = ffi::sqlite3_vfs_find(std::ptr::null());
            if default.is_null() {
                return ffi::SQLITE_ERROR;
            }
            let real_size = usize::try_from((*default).szOsFile).unwrap_or(0);
            let offset = real_size.next_multiple_of(std::mem::align_of::<Gathered>());
            let Ok(size) = c_int::try_from(offset + std::mem::size_of::<Gathered>()) else {
                return ffi::SQLITE_ERROR;
            };
            let _ = GATHERED_OFFSET.set(offset);
            let mut vfs = std::ptr::read(default);
            vfs.szOsFile = size;
            vfs.pNext = std::ptr::null_mut();
            vfs.zName = NAME.as_ptr();
            vfs.pAppData = default.cast::<c_void>();
            vfs.xOpen = Some(open);
            ffi::sqlite3_vfs_register(Box::leak(Box::new(vfs)), 0)
        }
    });
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(format!(
            "could not register the WAL-gathering VFS (SQLite code {rc})"
        ))
    }
}

/// Checks that `conn`, opened with this VFS, syncs the WAL at every commit (see the module's
/// documentation).
pub fn check_synchronous_full(conn: &rusqlite::Connection) -> Result<(), String> {
    let level: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    // 2 is FULL, 3 EXTRA.
    if level >= 2 {
        Ok(())
    } else {
        Err(format!(
            "a connection gathering its WAL writes must sync every commit (synchronous = {level})"
        ))
    }
}

/// # Safety
/// `file` must be a WAL file this module opened, not yet closed.
unsafe fn gathered<'a>(file: *mut ffi::sqlite3_file) -> &'a mut Gathered {
    let offset = GATHERED_OFFSET.get().copied().unwrap_or(0);
    &mut *file.cast::<u8>().add(offset).cast::<Gathered>()
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real = (*vfs).pAppData.cast::<ffi::sqlite3_vfs>();
    let Some(real_open) = (*real).xOpen else {
        return ffi::SQLITE_CANTOPEN;
    };
    let rc = real_open(real, name, file, flags, out_flags);
    if rc == ffi::SQLITE_OK && flags & ffi::SQLITE_OPEN_WAL != 0 && !(*file).pMethods.is_null() {
        let offset = GATHERED_OFFSET.get().copied().unwrap_or(0);
        std::ptr::write(
            file.cast::<u8>().add(offset).cast::<Gathered>(),
            Gathered {
                methods: (*file).pMethods,
                start: 0,
                bytes: Vec::new(),
            },
        );
        (*file).pMethods = &WAL_METHODS;
    }
    rc
}

/// Writes the gathered bytes out with one call of the default method.
unsafe fn write_out(file: *mut ffi::sqlite3_file) -> c_int {
    let g = gathered(file);
    if g.bytes.is_empty() {
        return ffi::SQLITE_OK;
    }
    #[cfg(test)]
    WRITTEN_OUT.fetch_add(1, Ordering::Relaxed);
    let Some(write) = (*g.methods).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let mut rc = ffi::SQLITE_OK;
    let mut offset = g.start;
    for chunk in g.bytes.chunks(MAX_CALL) {
        // A chunk is at most MAX_CALL bytes, which fits an int.
        let length = chunk.len() as c_int;
        rc = write(file, chunk.as_ptr().cast::<c_void>(), length, offset);
        if rc != ffi::SQLITE_OK {
            break;
        }
        offset += i64::from(length);
    }
    // Failed, the bytes are dropped too: SQLite answers the error by rolling the transaction
    // back, and the frames past its last commit are never read.
    g.bytes.clear();
    rc
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    let g = gathered(file);
    if !g.bytes.is_empty() && offset != g.start + g.bytes.len() as i64 {
        let rc = write_out(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    let g = gathered(file);
    if g.bytes.is_empty() {
        g.start = offset;
    }
    let length = usize::try_from(amount).unwrap_or(0);
    g.bytes
        .extend_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), length));
    #[cfg(test)]
    GATHERED.fetch_add(1, Ordering::Relaxed);
    if g.bytes.len() >= MAX_GATHERED {
        return write_out(file);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    buffer: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    let g = gathered(file);
    let end = offset + i64::from(amount);
    let read = || match (*gathered(file).methods).xRead {
        Some(read) => read(file, buffer, amount, offset),
        None => ffi::SQLITE_IOERR_READ,
    };
    if !g.bytes.is_empty() && offset < g.start + g.bytes.len() as i64 && end > g.start {
        written_out_then(file, read)
    } else {
        read()
    }
}

/// Writes the gathered bytes out, then runs `call` (a default method) if that succeeded.
///
/// # Safety
/// As [`gathered`].
unsafe fn written_out_then(file: *mut ffi::sqlite3_file, call: impl FnOnce() -> c_int) -> c_int {
    match write_out(file) {
        ffi::SQLITE_OK => call(),
        failed => failed,
    }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    written_out_then(file, || match (*gathered(file).methods).xSync {
        Some(sync) => sync(file, flags),
        None => ffi::SQLITE_IOERR_FSYNC,
    })
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    written_out_then(file, || match (*gathered(file).methods).xTruncate {
        Some(truncate) => truncate(file, size),
        None => ffi::SQLITE_IOERR_TRUNCATE,
    })
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    written_out_then(file, || match (*gathered(file).methods).xFileSize {
        Some(file_size) => file_size(file, size),
        None => ffi::SQLITE_IOERR_FSTAT,
    })
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    written_out_then(file, || match (*gathered(file).methods).xFileControl {
        Some(file_control) => file_control(file, op, arg),
        None => ffi::SQLITE_NOTFOUND,
    })
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let written = write_out(file);
    let methods = gathered(file).methods;
    std::ptr::drop_in_place(gathered(file));
    let closed = match (*methods).xClose {
        Some(close) => close(file),
        None => ffi::SQLITE_OK,
    };
    if written != ffi::SQLITE_OK {
        written
    } else {
        closed
    }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    match (*gathered(file).methods).xLock {
        Some(lock) => lock(file, level),
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    match (*gathered(file).methods).xUnlock {
        Some(unlock) => unlock(file, level),
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    match (*gathered(file).methods).xCheckReservedLock {
        Some(check) => check(file, out),
        None => {
            *out = 0;
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    match (*gathered(file).methods).xSectorSize {
        Some(sector_size) => sector_size(file),
        None => 4096,
    }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    match (*gathered(file).methods).xDeviceCharacteristics {
        Some(characteristics) => characteristics(file),
        None => 0,
    }
}

/// A WAL file's methods: version 1, so SQLite never asks it for shared memory or memory
/// mapping, which it uses only on database files.
static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};
