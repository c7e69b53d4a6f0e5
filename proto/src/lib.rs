//! The Merkle Mesh v1 contract, generated from `proto/merkle/**/*.proto`.
//!
//! This crate is the only home of generated code: services and clients import messages, client
//! stubs and server traits from here. [`FILE_DESCRIPTOR_SET`] feeds server reflection.

#![allow(clippy::all, missing_docs)]

/// Every file of the contract and its imports, encoded, with source comments.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/merkle_descriptor.bin"));

/// Messages shared by the services.
pub mod common {
    pub mod v1 {
        tonic::include_proto!("merkle.common.v1");
    }
}

/// `merkle.treebuilder.v1`: hashing directories into Merkle trees.
pub mod treebuilder {
    pub mod v1 {
        tonic::include_proto!("merkle.treebuilder.v1");
    }
}

/// `merkle.dbsync.v1`: snapshots in PostgreSQL.
pub mod dbsync {
    pub mod v1 {
        tonic::include_proto!("merkle.dbsync.v1");
    }
}

/// `merkle.cache.v1`: the Redis cache.
pub mod cache {
    pub mod v1 {
        tonic::include_proto!("merkle.cache.v1");
    }
}

/// `merkle.scheduler.v1`: sources and builds.
pub mod scheduler {
    pub mod v1 {
        tonic::include_proto!("merkle.scheduler.v1");
    }
}

/// `merkle.discovery.v1`: the fleet's client nodes.
pub mod discovery {
    pub mod v1 {
        tonic::include_proto!("merkle.discovery.v1");
    }
}

/// The fully qualified names of the five services; clients and health checks use them.
pub mod service_names {
    pub const TREE_BUILDER: &str = "merkle.treebuilder.v1.TreeBuilderService";
    pub const DB_SYNC: &str = "merkle.dbsync.v1.DbSyncService";
    pub const CACHE: &str = "merkle.cache.v1.CacheService";
    pub const SCHEDULER: &str = "merkle.scheduler.v1.SchedulerService";
    pub const DISCOVERY: &str = "merkle.discovery.v1.DiscoveryService";
}
