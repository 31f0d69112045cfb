//! A connection's place under `max-connections`, which a CONNECT tunnel takes along.

use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

/// A connection's place under `max-connections`. A CONNECT turns the connection into
/// a tunnel that outlives the HTTP connection, so the tunnel takes the place with it.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl ConnectionSlot {
    /// Holds `permit` until the connection, every clone of its front, and any tunnel
    /// that took it are gone.
    pub(crate) fn new(permit: OwnedSemaphorePermit) -> Self {
        ConnectionSlot(Arc::new(Mutex::new(Some(permit))))
    }

    pub(crate) fn take(&self) -> Option<OwnedSemaphorePermit> {
        crate::sync::lock(&self.0).take()
    }
}
