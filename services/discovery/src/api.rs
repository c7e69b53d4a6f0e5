//! The gRPC face of Discovery: checks requests and maps [`Fleet`] to the contract.

use std::{collections::BTreeMap, pin::Pin, sync::Arc};

use merkle_proto::discovery::v1::{
    Client, GetClientRequest, GetClientResponse, ListClientsRequest, ListClientsResponse,
    WatchClientsRequest, WatchClientsResponse, discovery_service_server::DiscoveryService,
};
use merkle_shared::shutdown::Shutdown;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    error::Error,
    fleet::{Fleet, Mode, diff},
};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Events queued per watcher on the way to the network.
const WATCH_QUEUE: usize = 256;

pub(crate) struct DiscoveryApi {
    fleet: Arc<Fleet>,
    shutdown: Shutdown,
}

impl DiscoveryApi {
    pub fn new(fleet: Arc<Fleet>, shutdown: Shutdown) -> Self {
        DiscoveryApi { fleet, shutdown }
    }
}

#[tonic::async_trait]
impl DiscoveryService for DiscoveryApi {
    type WatchClientsStream = ResponseStream<WatchClientsResponse>;

    async fn list_clients(
        &self,
        request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        let request = request.into_inner();
        let mode = if request.force_refresh {
            Mode::Force
        } else if request.refresh {
            Mode::Refresh
        } else {
            Mode::Cached
        };
        Ok(Response::new(self.fleet.list(mode).await?))
    }

    async fn get_client(
        &self,
        request: Request<GetClientRequest>,
    ) -> Result<Response<GetClientResponse>, Status> {
        let id = request.into_inner().id;
        if !merkle_shared::names::is_node_id(&id) {
            return Err(Error::BadRequest(
                "id: must be a node id, 1-253 characters of A-Z, a-z, 0-9, -, _, . and :".into(),
            )
            .into());
        }
        let list = self.fleet.list(Mode::Cached).await?;
        let refreshed = list.refresh_time.map(|t| t.to_string()).unwrap_or_default();
        let backend = list.backend;
        match list.clients.into_iter().find(|c| c.id == id) {
            Some(client) => Ok(Response::new(GetClientResponse {
                client: Some(client),
            })),
            None => Err(Error::NotFound(format!(
                "id: no client {id:?} in the {backend} list read at {refreshed} \
                 (ListClients with refresh reads the backend again)"
            ))
            .into()),
        }
    }

    async fn watch_clients(
        &self,
        _request: Request<WatchClientsRequest>,
    ) -> Result<Response<Self::WatchClientsStream>, Status> {
        let (generation, clients, mut changes) = self.fleet.subscribe().await?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let fleet = self.fleet.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // What this watcher has been told, to catch up after falling behind.
            let mut seen: BTreeMap<String, Client> = BTreeMap::new();
            let mut at = generation;
            let first = diff(&seen, &clients);
            seen = (*clients).clone();
            for event in first {
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            loop {
                let change = tokio::select! {
                    change = changes.recv() => change,
                    () = tx.closed() => return,
                    () = shutdown.wait() => return,
                };
                let events = match change {
                    Ok(change) if change.generation <= at => continue,
                    Ok(change) => {
                        at = change.generation;
                        for event in &change.events {
                            let Some(client) = &event.client else {
                                continue;
                            };
                            if event.event_type
                                == merkle_proto::discovery::v1::ClientEventType::Removed as i32
                            {
                                seen.remove(&client.id);
                            } else {
                                seen.insert(client.id.clone(), client.clone());
                            }
                        }
                        change.events.clone()
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::info!(
                            missed,
                            "a watcher fell behind; catching it up from the list"
                        );
                        let (now, clients) = fleet.current();
                        at = now;
                        let events = diff(&seen, &clients);
                        seen = (*clients).clone();
                        events
                    }
                    Err(RecvError::Closed) => return,
                };
                for event in events {
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
