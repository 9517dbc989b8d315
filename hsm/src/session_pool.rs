//! A pool of logged-in sessions, one in use per signing thread at a time.
//!
//! A `cryptoki::Session` is `Send` but not `Sync`, so concurrent signing needs one session per
//! signer. Sessions are opened lazily up to the pool size and handed back after use; a session
//! whose handle or login was lost is dropped instead, and a fresh one replaces it.

use std::sync::{Condvar, Mutex};

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use crate::Result;

/// A session with the handle of the key it signs with.
pub(crate) struct PooledSession {
    pub(crate) session: Session,
    pub(crate) key: ObjectHandle,
    /// The module generation the session was opened in.
    pub(crate) generation: u64,
}

impl PooledSession {
    /// Drops a session that is dead without closing it: after a re-initialisation its handle
    /// may belong to a new session, which closing it would end.
    pub(crate) fn abandon(self) {
        std::mem::forget(self.session);
    }
}

pub(crate) struct SessionPool {
    max: usize,
    state: Mutex<State>,
    returned: Condvar,
}

struct State {
    idle: Vec<PooledSession>,
    open: usize,
}

impl SessionPool {
    pub(crate) fn new(max: usize) -> Self {
        SessionPool {
            max: max.max(1),
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
            }),
            returned: Condvar::new(),
        }
    }

    pub(crate) fn size(&self) -> usize {
        self.max
    }

    /// Takes an idle session, opens a new one with `open` if the pool is not full, or waits
    /// up to `wait` for one to be returned (a hung HSM keeps its sessions: fail, do not queue).
    pub(crate) fn take(
        &self,
        open: impl FnOnce() -> Result<PooledSession>,
        wait: std::time::Duration,
    ) -> Result<PooledSession> {
        let deadline = std::time::Instant::now() + wait;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = state.idle.pop() {
                return Ok(s);
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return open().inspect_err(|_| self.forget());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(crate::Error::Timeout(format!(
                    "no HSM session became free within {}s: the HSM is not answering",
                    wait.as_secs_f64()
                )));
            }
            state = self
                .returned
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Returns a healthy session to the pool.
    pub(crate) fn give_back(&self, session: PooledSession) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.idle.push(session);
        drop(state);
        self.returned.notify_one();
    }

    /// Forgets a session that was dropped because it broke, making room for a new one.
    pub(crate) fn forget(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.open -= 1;
        drop(state);
        self.returned.notify_one();
    }

    /// Abandons every idle session (after a token-wide failure, all of them are suspect).
    pub(crate) fn clear_idle(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = state.idle.len();
        for s in state.idle.drain(..) {
            s.abandon();
        }
        state.open -= n;
        drop(state);
        self.returned.notify_all();
    }
}
