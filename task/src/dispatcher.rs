//! [`TaskDispatcher`]: routes a task to the processor registered for its type (spec §4.2).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::{TaskError, TaskMessage, TaskType};

/// The future a processor returns.
pub type ProcessFuture<'a> = Pin<Box<dyn Future<Output = Result<(), TaskError>> + Send + 'a>>;

/// Handles the tasks of one type (spec `TaskProcessor`).
pub trait TaskProcessor: Send + Sync + 'static {
    /// Carries `task` out. `Ok` means the record may be committed; an error is retried later
    /// when [`TaskError::is_retryable`], and otherwise logged and the record committed.
    fn process<'a>(&'a self, task: &'a TaskMessage) -> ProcessFuture<'a>;
}

/// Task type -> processor.
#[derive(Default)]
pub struct TaskDispatcher {
    /// The registered processors.
    processors: HashMap<TaskType, Box<dyn TaskProcessor>>,
}

impl fmt::Debug for TaskDispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<_> = self.processors.keys().collect();
        types.sort_by_key(|t| format!("{t:?}"));
        f.debug_struct("TaskDispatcher")
            .field("processors", &types)
            .finish()
    }
}

impl TaskDispatcher {
    /// A dispatcher with no processors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `processor` handle the tasks of `task_type` (replacing any earlier one).
    pub fn register(&mut self, task_type: TaskType, processor: impl TaskProcessor) {
        self.processors.insert(task_type, Box::new(processor));
    }

    /// Whether a processor handles `task_type`.
    pub fn handles(&self, task_type: TaskType) -> bool {
        self.processors.contains_key(&task_type)
    }

    /// Hands `task` to its processor; [`TaskError::NoProcessor`] when there is none.
    pub async fn dispatch(&self, task: &TaskMessage) -> Result<(), TaskError> {
        match self.processors.get(&task.task_type) {
            Some(p) => p.process(task).await,
            None => Err(TaskError::NoProcessor(task.task_type)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Counting(Arc<AtomicUsize>);

    impl TaskProcessor for Counting {
        fn process<'a>(&'a self, _task: &'a TaskMessage) -> ProcessFuture<'a> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
        }
    }

    fn task(task_type: TaskType) -> TaskMessage {
        TaskMessage {
            trace_id: "t".into(),
            task_type,
            task_id: "1".into(),
            data: serde_json::Value::Null,
            headers: BTreeMap::new(),
            created_at: 0,
        }
    }

    #[tokio::test]
    async fn dispatches_by_type() {
        let n = Arc::new(AtomicUsize::new(0));
        let mut d = TaskDispatcher::new();
        d.register(TaskType::Fanout, Counting(Arc::clone(&n)));
        assert!(d.handles(TaskType::Fanout));
        d.dispatch(&task(TaskType::Fanout)).await.expect("fanout");
        assert_eq!(n.load(Ordering::Relaxed), 1);
        let err = d.dispatch(&task(TaskType::Audit)).await;
        assert!(matches!(err, Err(TaskError::NoProcessor(TaskType::Audit))));
        assert!(format!("{d:?}").contains("Fanout"));
    }
}
