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

    /// Takes an idle session, opens a new one with `open` if the pool is not full, or waits.
    pub(crate) fn take(
        &self,
        open: impl FnOnce() -> Result<PooledSession>,
    ) -> Result<PooledSession> {
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
            state = self.returned.wait(state).unwrap_or_else(|p| p.into_inner());
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

    /// Drops every idle session (after a token-wide failure, all of them are suspect).
    pub(crate) fn clear_idle(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = state.idle.len();
        state.idle.clear();
        state.open -= n;
        drop(state);
        self.returned.notify_all();
    }
}
