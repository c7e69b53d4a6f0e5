//! Reading trees DbSync stores, node by node, for every client that checks them (TreeBuilder's
//! VerifyTree, `merklectl verify-history --deep`).

use merkle_core::{Digest, DirNode, Profile};
use merkle_proto::dbsync::v1::{ListDirectoryRequest, db_sync_service_client::DbSyncServiceClient};

use crate::{client::Channel, convert::entry_from_proto};

/// One stored node, all its entries (every page of ListDirectory of the node's hash), checked
/// against its hash: DATA_LOSS when DbSync's node does not hash to its key.
pub async fn fetch_node(
    client: &DbSyncServiceClient<Channel>,
    hash: Digest,
    profile: Profile,
) -> Result<DirNode, tonic::Status> {
    let mut client = client.clone();
    let mut entries = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_directory(ListDirectoryRequest {
                root_hash: hash.to_hex(),
                page_size: 10_000,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        for e in &page.entries {
            entries.push(
                entry_from_proto(e, profile == Profile::Full).map_err(tonic::Status::internal)?,
            );
        }
        page_token = page.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    let node = DirNode { entries };
    if node.hash(profile).ok() != Some(hash) {
        return Err(tonic::Status::data_loss(format!(
            "DbSync's node {hash} does not hash to its key with the {} profile",
            profile.name()
        )));
    }
    Ok(node)
}
