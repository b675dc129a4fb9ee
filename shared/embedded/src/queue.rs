//! The in-process stage queue of the embedded default (`relink run`).

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;

use relink_core::error::Result;
use relink_core::event::StageEvent;
use relink_core::ports::StageQueue;

/// A FIFO of stage events in memory.
#[derive(Debug, Default)]
pub struct MemQueue {
    events: Mutex<VecDeque<StageEvent>>,
}

impl MemQueue {
    /// Takes the oldest event.
    pub fn pop(&self) -> Option<StageEvent> {
        self.events.lock().expect("queue lock").pop_front()
    }
}

#[async_trait]
impl StageQueue for MemQueue {
    async fn send(&self, event: &StageEvent) -> Result<()> {
        self.events
            .lock()
            .expect("queue lock")
            .push_back(event.clone());
        Ok(())
    }
}
