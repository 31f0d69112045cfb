//! The one proxy port: the accept loop, bounded by `max-connections`. Each connection
//! is served by [`super::serve`].

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::serve::{serve_connection, Front};
use super::slot::ConnectionSlot;
use super::Edge;
use crate::metrics::Limit;

pub(crate) async fn serve(edge: Arc<Edge>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(edge.limits.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = edge.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning on the error.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            edge.metrics.limit_hit(Limit::MaxConnections);
            tracing::warn!(%peer, limit = edge.limits.max_connections, "connection limit reached, closing new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Released when the connection and every clone of its front are gone, unless a
        // CONNECT tunnel took it along.
        let slot = ConnectionSlot::new(permit);
        edge.tasks.spawn(serve_connection(
            edge.clone(),
            stream,
            Front::Listener { peer, slot },
        ));
    }
}
