//! What every build shares: PostgreSQL, the cache, the other services' clients, the
//! registry of builds running here, and the slots that bound them.

use parking_lot::Mutex;
use std::{collections::HashMap, sync::Arc};

use merkle_proto::{
    dbsync::v1::db_sync_service_client::DbSyncServiceClient,
    discovery::v1::discovery_service_client::DiscoveryServiceClient,
    treebuilder::v1::tree_builder_service_client::TreeBuilderServiceClient,
};
use merkle_shared::{
    cache::CacheClient,
    client::{Channel, channel},
    config::{ClientArgs, ConfigError},
    postgres::PgPool,
};
use tokio::sync::Semaphore;

use crate::registry::Registry;

/// Node TreeBuilders whose channels are kept; past this many the set starts again.
const MAX_NODE_CHANNELS: usize = 10_000;

/// The services a build uses.
#[derive(Clone)]
pub struct Services {
    tree_builder: Option<TreeBuilderServiceClient<Channel>>,
    db_sync: Option<DbSyncServiceClient<Channel>>,
    discovery: Option<DiscoveryServiceClient<Channel>>,
    /// Fleet nodes' TreeBuilders, by address (channels connect lazily and are reused).
    nodes: Arc<Mutex<HashMap<String, TreeBuilderServiceClient<Channel>>>>,
    args: ClientArgs,
}

fn tree_builder_client(channel: Channel) -> TreeBuilderServiceClient<Channel> {
    TreeBuilderServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

impl Services {
    pub fn new(
        tree_builder: Option<&str>,
        db_sync: Option<&str>,
        discovery: Option<&str>,
        args: &ClientArgs,
    ) -> Result<Self, ConfigError> {
        Ok(Services {
            tree_builder: tree_builder
                .map(|a| channel("TREE_BUILDER_ADDR (--tree-builder-addr)", a, args))
                .transpose()?
                .map(tree_builder_client),
            db_sync: db_sync
                .map(|a| channel("DB_SYNC_ADDR (--db-sync-addr)", a, args))
                .transpose()?
                .map(DbSyncServiceClient::new),
            discovery: discovery
                .map(|a| channel("DISCOVERY_ADDR (--discovery-addr)", a, args))
                .transpose()?
                .map(DiscoveryServiceClient::new),
            nodes: Arc::default(),
            args: args.clone(),
        })
    }

    pub fn discovery(&self) -> Result<DiscoveryServiceClient<Channel>, String> {
        self.discovery.clone().ok_or_else(|| {
            "DISCOVERY_ADDR is not set: fleet sources cannot list their nodes".to_owned()
        })
    }

    /// The TreeBuilder of a fleet node at `address` (`host:port`).
    pub fn node_tree_builder(
        &self,
        address: &str,
    ) -> Result<TreeBuilderServiceClient<Channel>, String> {
        let mut nodes = self.nodes.lock();
        if let Some(client) = nodes.get(address) {
            return Ok(client.clone());
        }
        let client = channel(
            "the node's tree_builder_address",
            &format!("http://{address}"),
            &self.args,
        )
        .map(tree_builder_client)
        .map_err(|e| e.to_string())?;
        if nodes.len() >= MAX_NODE_CHANNELS {
            nodes.clear();
        }
        nodes.insert(address.to_owned(), client.clone());
        Ok(client)
    }

    pub fn tree_builder(&self) -> Result<TreeBuilderServiceClient<Channel>, String> {
        self.tree_builder
            .clone()
            .ok_or_else(|| "TREE_BUILDER_ADDR is not set: nothing can be built".to_owned())
    }

    /// The settings of the calls to the other services (their retries, `CLIENT_MAX_ATTEMPTS`).
    pub fn client_args(&self) -> &ClientArgs {
        &self.args
    }

    pub fn db_sync(&self) -> Result<DbSyncServiceClient<Channel>, String> {
        self.db_sync
            .clone()
            .ok_or_else(|| "DB_SYNC_ADDR is not set: nothing can be stored".to_owned())
    }
}

/// What every build shares.
pub struct Context {
    pub pool: PgPool,
    pub cache: CacheClient,
    pub services: Services,
    /// Nodes a fleet build builds at once.
    pub fleet_parallelism: usize,
    pub registry: Registry,
    pub replica: String,
    pub slots: Semaphore,
}
