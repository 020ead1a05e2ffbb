//! A value swapped whole on reload and read on every request, without the request path
//! touching memory that other worker threads write.
//!
//! A plain `RwLock<Arc<T>>` costs each read four atomic read-modify-writes on two cache lines
//! every worker thread shares (the lock word, then the `Arc`'s count, each taken and given
//! back). With two worker threads serving requests at once those lines move between cores on
//! every read; a profile of the request path showed the lock's `cmpxchg` as the single most
//! expensive instruction of the connection loop.
//!
//! Here each thread keeps its *own copy* of the current value (its own allocation, so its own
//! reference count), tagged with the generation it was copied at. A read loads the generation
//! (a plain load of a line nobody writes between reloads) and, when it matches, clones the
//! thread's own `Arc` ([`Snapshot::get`]) or only reads through it ([`Snapshot::with`]: no
//! count is written at all, which matters when the clone would travel to another thread with
//! a request's task). A reload stores the new value and bumps the generation; each thread
//! copies the new value on its next read. A thread holds on to a superseded copy until its next
//! read, so a value's `Drop` may run late (or at the thread's exit).

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Each snapshot's identity, for the per-thread copies.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// At most this many copies are kept per thread (one per live snapshot; a process runs three,
/// tests create many one after another).
const MAX_COPIES: usize = 16;

/// One thread's copy of one snapshot's value.
struct Copy {
    id: u64,
    generation: u64,
    /// The `Arc<T>` of a `Snapshot<T>`.
    value: Box<dyn Any>,
}

thread_local! {
    static COPIES: RefCell<Vec<Copy>> = const { RefCell::new(Vec::new()) };
}

/// A value read on the request path and replaced whole (see the module docs).
#[derive(Debug)]
pub struct Snapshot<T> {
    id: u64,
    generation: AtomicU64,
    current: RwLock<Arc<T>>,
}

impl<T: Clone + Send + Sync + 'static> Snapshot<T> {
    /// A snapshot holding `value`.
    pub fn new(value: T) -> Self {
        Snapshot {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            current: RwLock::new(Arc::new(value)),
        }
    }

    /// Replace the value; every thread reads the new one from its next read on.
    pub fn replace(&self, value: T) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(value);
        // Inside the lock and after the store: a reader that sees the new generation then
        // reads the new value.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The current value, from this thread's own copy.
    pub fn get(&self) -> Arc<T> {
        self.read(Arc::clone)
    }

    /// `f` of the current value, read in this thread's own copy without taking a reference
    /// to it: for a field or two, no reference count is touched at all.
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        self.read(|value| f(value))
    }

    /// `f` of this thread's copy of the current value (made first if need be).
    fn read<R>(&self, f: impl FnOnce(&Arc<T>) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        COPIES.with(|copies| {
            if let Ok(copies) = copies.try_borrow() {
                let mine = copies
                    .iter()
                    .find(|c| c.id == self.id && c.generation == generation)
                    .and_then(|c| c.value.downcast_ref::<Arc<T>>());
                if let Some(mine) = mine {
                    return f(mine);
                }
            }
            f(&self.copy(generation))
        })
    }

    /// Copy the current value for this thread, tagged with `generation`.
    fn copy(&self, generation: u64) -> Arc<T> {
        // Read after the generation was loaded: at least that generation's value. Tagged
        // with the generation loaded, so a newer value read here is copied again next time.
        let shared = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mine = Arc::new(T::clone(&shared));
        COPIES.with(|copies| {
            let Ok(mut copies) = copies.try_borrow_mut() else {
                return;
            };
            copies.retain(|c| c.id != self.id);
            if copies.len() >= MAX_COPIES {
                copies.remove(0);
            }
            copies.push(Copy {
                id: self.id,
                generation,
                value: Box::new(mine.clone()),
            });
        });
        mine
    }
}

impl<T> Drop for Snapshot<T> {
    fn drop(&mut self) {
        // This thread's copy goes with the snapshot (other threads' go on their next miss).
        let id = self.id;
        let _ = COPIES.try_with(|copies| {
            if let Ok(mut copies) = copies.try_borrow_mut() {
                copies.retain(|c| c.id != id);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_follow_replacements_on_every_thread() {
        let s = Arc::new(Snapshot::new(String::from("one")));
        assert_eq!(*s.get(), "one");
        let first = s.get();
        assert!(Arc::ptr_eq(&first, &s.get()), "a thread reads its own copy");
        s.replace(String::from("two"));
        assert_eq!(*s.get(), "two");
        assert_eq!(*first, "one", "a value read before stays as it was");
        let other = s.clone();
        let seen = std::thread::spawn(move || {
            let before = other.get();
            other.replace(String::from("three"));
            (before.to_string(), other.get().to_string())
        })
        .join()
        .expect("thread");
        assert_eq!(seen, ("two".into(), "three".into()));
        assert_eq!(
            *s.get(),
            "three",
            "a replacement on another thread is seen here"
        );
    }

    #[test]
    fn threads_copy_the_value_rather_than_share_it() {
        let s = Arc::new(Snapshot::new(vec![1u8]));
        let here = s.get();
        let other = s.clone();
        let there = std::thread::spawn(move || other.get())
            .join()
            .expect("thread");
        assert_eq!(here, there);
        assert!(
            !Arc::ptr_eq(&here, &there),
            "each thread has its own allocation"
        );
    }

    #[test]
    fn snapshots_do_not_read_each_others_copies() {
        let a = Snapshot::new(1u32);
        let b = Snapshot::new(2u32);
        for _ in 0..3 {
            assert_eq!((*a.get(), *b.get()), (1, 2));
        }
        let many: Vec<_> = (0..MAX_COPIES as u32 + 4).map(Snapshot::new).collect();
        for (i, s) in many.iter().enumerate() {
            assert_eq!(*s.get(), i as u32);
        }
        assert_eq!(
            (*a.get(), *b.get()),
            (1, 2),
            "evicted copies are made again"
        );
    }
}
