//! The lock `mmu_lock` is built on, [`MmuLock`], whose guards are the only
//! values implementing the sealed [`MmuLockHeld`] (read or write) and
//! [`MmuWriteLockHeld`] traits. Functions that must run under the lock take
//! `&impl MmuLockHeld`; a wrapper guard hands out its inner guard's
//! [`HeldMmuLock`] token.

use std::cell::OnceCell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use crossbeam_utils::CachePadded;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::percpu::{SHARDS, shard_index};

mod sealed {
    pub trait Sealed {}
}

/// Proof that `mmu_lock` is held, for reading or writing. Implemented only
/// by this module's guards and tokens (sealed).
pub trait MmuLockHeld: sealed::Sealed {
    /// The token for this hold of the lock.
    fn held(&self) -> HeldMmuLock<'_>;
}

/// Proof that `mmu_lock` is held for writing. Sealed.
pub trait MmuWriteLockHeld: MmuLockHeld {}

/// A token proving `mmu_lock` is held (for read or write) for `'a`; it has
/// no public constructor, only [`MmuLockHeld::held`] makes one.
#[derive(Clone, Copy, Debug)]
pub struct HeldMmuLock<'a> {
    write: bool,
    _guard: PhantomData<&'a ()>,
}

impl HeldMmuLock<'_> {
    /// Whether the lock is held for writing.
    pub fn is_write(&self) -> bool {
        self.write
    }
}

impl sealed::Sealed for HeldMmuLock<'_> {}
impl MmuLockHeld for HeldMmuLock<'_> {
    fn held(&self) -> HeldMmuLock<'_> {
        *self
    }
}

/// A token proving `mmu_lock` is held for writing for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct HeldMmuWriteLock<'a> {
    _guard: PhantomData<&'a ()>,
}

impl sealed::Sealed for HeldMmuWriteLock<'_> {}
impl MmuLockHeld for HeldMmuWriteLock<'_> {
    fn held(&self) -> HeldMmuLock<'_> {
        HeldMmuLock {
            write: true,
            _guard: PhantomData,
        }
    }
}
impl MmuWriteLockHeld for HeldMmuWriteLock<'_> {}

/// The reader-writer lock `mmu_lock` is built on: a big-reader lock (the
/// idea of Linux's `percpu_rw_semaphore`). It is sharded per thread
/// ([`crate::percpu`]): a reader locks only its thread's shard, so parallel
/// faults share no cache line; a writer locks every shard, in index order.
/// KVM's `rwlock_t` bounces one cache line per read acquisition, which a
/// kernel fault path amortizes; vmmu's fault path is short enough that the
/// one line halved 2-vCPU throughput. Guards prove the hold in the types.
///
/// The protected data is reached through `&T` from a read guard and
/// `&mut T` from the write guard. It sits in an inner `RwLock` that is
/// never contended (a writer takes it only after every shard, a reader
/// only under its shard): it lets the guards hand out references without
/// `unsafe`, and a reader takes it only when it dereferences its guard
/// (the TDP MMU's readers, whose data is `()`, never do).
///
/// A lock made inside a shuttle model run ([`crate::sync`], `shuttle`
/// feature) is one shuttle `RwLock` instead, because it is held across
/// schedule points: a model's threads share one OS thread (and so one
/// shard), and a `parking_lot` lock would block that thread for good. Such
/// a lock must be used only inside that run.
#[derive(Debug)]
pub struct MmuLock<T> {
    shards: Box<[CachePadded<RwLock<()>>]>,
    #[cfg(feature = "shuttle")]
    model: Option<shuttle::sync::RwLock<()>>,
    data: RwLock<T>,
}

/// How a read guard holds the lock (the guard is kept for its `Drop`).
#[derive(Debug)]
#[allow(dead_code)]
enum ReadHold<'a> {
    Shard(RwLockReadGuard<'a, ()>),
    #[cfg(feature = "shuttle")]
    Model(shuttle::sync::RwLockReadGuard<'a, ()>),
}

/// How a write guard holds the lock (the guards are kept for their `Drop`).
#[derive(Debug)]
#[allow(dead_code)]
enum WriteHold<'a> {
    Shards([RwLockWriteGuard<'a, ()>; SHARDS]),
    #[cfg(feature = "shuttle")]
    Model(shuttle::sync::RwLockWriteGuard<'a, ()>),
}

impl<T: Default> Default for MmuLock<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> MmuLock<T> {
    /// A lock protecting `data`.
    pub fn new(data: T) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| CachePadded::new(RwLock::new(()))).collect(),
            #[cfg(feature = "shuttle")]
            model: crate::sync::in_model().then(|| shuttle::sync::RwLock::new(())),
            data: RwLock::new(data),
        }
    }

    /// Takes the lock for reading (KVM's `read_lock(&kvm->mmu_lock)`).
    pub fn read(&self) -> MmuLockReadGuard<'_, T> {
        #[cfg(feature = "shuttle")]
        if let Some(model) = &self.model {
            return MmuLockReadGuard {
                data: OnceCell::new(),
                lock: &self.data,
                _hold: ReadHold::Model(model.read().expect("a model thread panicked holding mmu_lock")),
            };
        }
        MmuLockReadGuard {
            data: OnceCell::new(),
            lock: &self.data,
            _hold: ReadHold::Shard(self.shards[shard_index()].read()),
        }
    }

    /// Takes the lock for writing: every shard, in index order (the one
    /// lock order, so two writers never deadlock).
    pub fn write(&self) -> MmuLockWriteGuard<'_, T> {
        let hold = Some(self.write_hold());
        MmuLockWriteGuard {
            data: Some(self.data.write()),
            hold,
            lock: self,
        }
    }

    fn write_hold(&self) -> WriteHold<'_> {
        #[cfg(feature = "shuttle")]
        if let Some(model) = &self.model {
            return WriteHold::Model(model.write().expect("a model thread panicked holding mmu_lock"));
        }
        WriteHold::Shards(std::array::from_fn(|i| self.shards[i].write()))
    }

    /// The protected data, consuming the lock.
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

/// `mmu_lock` held for reading. (Fields drop in order: the data's inner
/// lock before the hold.)
#[derive(Debug)]
pub struct MmuLockReadGuard<'a, T> {
    /// The inner lock of the data, taken at the first dereference.
    data: OnceCell<RwLockReadGuard<'a, T>>,
    lock: &'a RwLock<T>,
    _hold: ReadHold<'a>,
}

/// `mmu_lock` held for writing.
#[derive(Debug)]
pub struct MmuLockWriteGuard<'a, T> {
    /// The data; `Some` whenever `hold` is.
    data: Option<RwLockWriteGuard<'a, T>>,
    /// Always `Some` but inside [`MmuLockWriteGuard::unlocked`].
    hold: Option<WriteHold<'a>>,
    lock: &'a MmuLock<T>,
}

impl<T> Deref for MmuLockReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.data.get_or_init(|| self.lock.read())
    }
}

impl<T> Deref for MmuLockWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.data
            .as_ref()
            .expect("the write guard holds the data while it holds the lock")
    }
}

/// The write lock is exclusive: the data is the holder's to change.
impl<T> DerefMut for MmuLockWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.data
            .as_mut()
            .expect("the write guard holds the data while it holds the lock")
    }
}

impl<T> sealed::Sealed for MmuLockReadGuard<'_, T> {}
impl<T> MmuLockHeld for MmuLockReadGuard<'_, T> {
    fn held(&self) -> HeldMmuLock<'_> {
        HeldMmuLock {
            write: false,
            _guard: PhantomData,
        }
    }
}

impl<T> sealed::Sealed for MmuLockWriteGuard<'_, T> {}
impl<T> MmuLockHeld for MmuLockWriteGuard<'_, T> {
    fn held(&self) -> HeldMmuLock<'_> {
        HeldMmuLock {
            write: true,
            _guard: PhantomData,
        }
    }
}
impl<T> MmuWriteLockHeld for MmuLockWriteGuard<'_, T> {}

impl<T> MmuLockWriteGuard<'_, T> {
    /// The write-hold token.
    pub fn held_write(&self) -> HeldMmuWriteLock<'_> {
        HeldMmuWriteLock { _guard: PhantomData }
    }

    /// The write-hold token and the data, borrowed together: what is
    /// validated under the lock (a [`crate::mem::ValidatedMapping`]
    /// borrows the token) stays usable while the data changes.
    pub fn split(&mut self) -> (HeldMmuWriteLock<'_>, &mut T) {
        (
            HeldMmuWriteLock { _guard: PhantomData },
            self.data
                .as_mut()
                .expect("the write guard holds the data while it holds the lock"),
        )
    }

    /// Releases the lock, runs `f`, and takes the lock again (KVM drops
    /// `mmu_lock` this way to allocate, or to yield in a long walk). Taking
    /// `&mut self` ends every borrow of the guard first: nothing obtained
    /// under the lock (a token, a validated host mapping) survives into `f`
    /// or past it. The caller must treat what it read under the lock as
    /// stale afterwards (a cursor restarts from the root).
    pub fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        drop(self.data.take());
        drop(self.hold.take());
        let r = f();
        self.hold = Some(self.lock.write_hold());
        self.data = Some(self.lock.data.write());
        r
    }
}
