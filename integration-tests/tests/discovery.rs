//! Discovery as its real binary, with the real Cache service and Redis, against loopback
//! stand-ins of Nomad's HTTP API and the Kubernetes API (`merkle-stand-ins`) and a static
//! file: the incremental claim counted in backend calls, paging, the per-node cache across a
//! restart, single-flight refreshes, outages answered STALE, credentials refused, Nomad over
//! mutual TLS, a backend unreachable at start, watches (with 410 Gone), Redis down, and bad
//! input.

use std::{collections::BTreeMap, path::Path, time::Duration};

use integration_tests::{ClientAuth, RunningService, ServingStatus, TestStack, tail};
use merkle_proto::discovery::v1::{
    CacheState, Client as NodeClient, ClientEventType, GetClientRequest, ListClientsRequest,
    ListClientsResponse, WatchClientsRequest, WatchClientsResponse,
    discovery_service_client::DiscoveryServiceClient,
};
use merkle_stand_ins::{
    kubernetes::{KubeNode, KubePod, KubernetesStandIn},
    nomad::{Node, NomadStandIn, Outage},
};
use tonic::{Code, Streaming, transport::Channel};

type Client = DiscoveryServiceClient<ClientAuth<Channel>>;

/// Redis and the Cache service, for Discovery to cache through.
async fn with_cache(stack: &mut TestStack) -> String {
    stack.start_redis().await;
    stack.start_serving("cache").await.uri()
}

/// Starts Discovery with `env` (and the cache, when given) and waits for `status`.
async fn discovery(
    stack: &mut TestStack,
    cache: Option<&str>,
    env: &[(&str, String)],
    status: ServingStatus,
) -> (Client, usize) {
    let mut all: Vec<(&str, String)> = env.to_vec();
    if let Some(cache) = cache {
        all.push(("CACHE_ADDR", cache.to_owned()));
    }
    let service = stack.start_service("discovery", &all);
    service.wait_for(status).await;
    let client = DiscoveryServiceClient::new(service.channel());
    (client, stack.services().len() - 1)
}

fn nomad_env(nomad: &NomadStandIn, page_size: u32) -> Vec<(&'static str, String)> {
    vec![
        ("DISCOVERY_BACKEND", "nomad".into()),
        ("NOMAD_ADDR", nomad.addr()),
        ("PAGE_SIZE", page_size.to_string()),
        ("BACKEND_TIMEOUT", "2s".into()),
    ]
}

/// A Nomad stand-in with `nodes` numbered nodes, and Discovery on it (no cache), SERVING.
async fn nomad_fleet(stack: &mut TestStack, nodes: usize) -> (NomadStandIn, Client, usize) {
    let nomad = NomadStandIn::start().await.expect("nomad stand-in");
    for n in 0..nodes {
        nomad.upsert(Node::numbered(n));
    }
    let (c, index) = discovery(stack, None, &nomad_env(&nomad, 500), ServingStatus::Serving).await;
    (nomad, c, index)
}

async fn list(c: &mut Client, refresh: bool, force_refresh: bool) -> ListClientsResponse {
    c.list_clients(ListClientsRequest {
        refresh,
        force_refresh,
    })
    .await
    .expect("ListClients")
    .into_inner()
}

fn state(answer: &ListClientsResponse) -> CacheState {
    CacheState::try_from(answer.cache_state).expect("known cache state")
}

/// new, changed, unchanged, removed, backend calls.
fn counts(answer: &ListClientsResponse) -> (u64, u64, u64, u64, u64) {
    let s = answer.summary.unwrap_or_default();
    (
        s.new_count,
        s.changed_count,
        s.unchanged_count,
        s.removed_count,
        s.backend_calls,
    )
}

fn log_of(stack: &TestStack, index: usize) -> String {
    std::fs::read_to_string(&stack.services()[index].log).unwrap_or_default()
}

fn service(stack: &TestStack, index: usize) -> &RunningService {
    &stack.services()[index]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nomad_refresh_fetches_only_new_and_changed_nodes() {
    let mut stack = TestStack::new();
    let cache = with_cache(&mut stack).await;
    let nomad = NomadStandIn::start().await.expect("nomad stand-in");
    for n in 0..1000 {
        nomad.upsert(Node::numbered(n));
    }
    // 1,000 nodes in pages of 300: four list calls per round.
    let env = nomad_env(&nomad, 300);
    let (mut c, _) = discovery(&mut stack, Some(&cache), &env, ServingStatus::Serving).await;

    // The first list (read by the health probe) is answered from memory: HOT.
    let first = list(&mut c, false, false).await;
    assert_eq!(first.clients.len(), 1000);
    assert_eq!(first.backend, "nomad");
    assert_eq!(nomad.calls().list, 4);
    assert_eq!(nomad.calls().detail, 1000);
    let node = first
        .clients
        .iter()
        .find(|n| n.name == "client-7")
        .expect("client-7");
    assert_eq!(node.address, "127.1.0.8:4646");
    assert_eq!(node.tree_builder_address, "127.1.0.8:50052");
    assert!(node.ready);
    assert_eq!(node.status, "ready");
    assert!(!node.version.is_empty() && node.fetch_time.is_some());
    assert_eq!(state(&list(&mut c, false, false).await), CacheState::Hot);

    // 10 nodes change: a refresh lists every page and fetches exactly those 10.
    nomad.reset_calls();
    for n in (0..1000).step_by(100) {
        let mut node = Node::numbered(n);
        node.meta.insert(
            "merkle_tree_builder".into(),
            format!("127.1.9.{}:7000", n / 100),
        );
        nomad.upsert(node);
    }
    let refreshed = list(&mut c, true, false).await;
    assert_eq!(state(&refreshed), CacheState::Refreshed);
    assert_eq!(counts(&refreshed), (0, 10, 990, 0, 4 + 10));
    assert_eq!(nomad.calls().list, 4);
    assert_eq!(nomad.calls().detail, 10);
    let moved = refreshed
        .clients
        .iter()
        .find(|n| n.name == "client-300")
        .expect("client-300");
    assert_eq!(moved.tree_builder_address, "127.1.9.3:7000");
    assert_eq!(
        moved.labels.get("merkle_tree_builder").map(String::as_str),
        Some("127.1.9.3:7000")
    );

    // A node removed, then back: removed, then new.
    let gone = Node::numbered(5);
    nomad.remove(&gone.id);
    nomad.reset_calls();
    let answer = list(&mut c, true, false).await;
    assert_eq!(counts(&answer), (0, 0, 999, 1, 4));
    assert!(answer.clients.iter().all(|n| n.id != gone.id));
    nomad.upsert(gone.clone());
    let answer = list(&mut c, true, false).await;
    assert_eq!(counts(&answer), (1, 0, 999, 0, 4 + 1));
    assert!(answer.clients.iter().any(|n| n.id == gone.id));

    // force_refresh fetches every node.
    nomad.reset_calls();
    let forced = list(&mut c, false, true).await;
    assert_eq!(state(&forced), CacheState::Bypass);
    assert_eq!(forced.summary.expect("summary").backend_calls, 4 + 1000);
    assert_eq!(nomad.calls().detail, 1000);

    // A restarted Discovery takes the list and the unchanged nodes from the cache.
    stack
        .service_mut("discovery")
        .process
        .stop(Duration::from_secs(5));
    nomad.reset_calls();
    let (mut c, _) = discovery(&mut stack, Some(&cache), &env, ServingStatus::Serving).await;
    let after = list(&mut c, true, false).await;
    assert_eq!(counts(&after), (0, 0, 1000, 0, 4), "{:?}", after.summary);
    // The health probe's refresh and this one: lists only, no detail fetched.
    assert_eq!(nomad.calls().detail, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_refreshes_share_one_backend_round() {
    let mut stack = TestStack::new();
    let (nomad, c, _) = nomad_fleet(&mut stack, 20).await;
    nomad.reset_calls();
    nomad.set_latency(Duration::from_millis(300));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { list(&mut c, true, false).await }));
    }
    for task in tasks {
        let answer = task.await.expect("task");
        assert_eq!(answer.clients.len(), 20);
        assert_eq!(counts(&answer), (0, 0, 20, 0, 1));
    }
    assert_eq!(nomad.calls().list, 1, "ten refreshes, one backend round");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nomad_outage_is_answered_stale_with_the_error_then_recovers() {
    let mut stack = TestStack::new();
    let (nomad, mut c, index) = nomad_fleet(&mut stack, 5).await;

    nomad.set_outage(Some(Outage::ServerError));
    let stale = list(&mut c, true, false).await;
    assert_eq!(state(&stale), CacheState::Stale);
    assert_eq!(
        stale.clients.len(),
        5,
        "the last known list, never an empty one"
    );
    assert!(
        stale.error.contains("500") && stale.error.contains("No cluster leader"),
        "{}",
        stale.error
    );

    // An answer that does not parse: the list is kept, the error quotes the answer.
    nomad.set_outage(Some(Outage::Garbage));
    let stale = list(&mut c, true, false).await;
    assert_eq!(state(&stale), CacheState::Stale);
    assert_eq!(stale.clients.len(), 5);
    assert!(
        stale.error.contains("does not parse") && stale.error.contains("502 Bad Gateway"),
        "{}",
        stale.error
    );

    // Still SERVING (the last list answers); recovered at the next refresh.
    service(&stack, index)
        .wait_for(ServingStatus::Serving)
        .await;
    nomad.set_outage(None);
    nomad.upsert(Node::numbered(5));
    let recovered = list(&mut c, true, false).await;
    assert_eq!(state(&recovered), CacheState::Refreshed);
    assert_eq!(recovered.error, "");
    assert_eq!(counts(&recovered), (1, 0, 5, 0, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_unreachable_or_misconfigured_at_start_is_not_serving_until_it_answers() {
    let mut stack = TestStack::new();
    let port = merklectl::stack::free_port().expect("free port");
    let env = vec![
        ("DISCOVERY_BACKEND", "nomad".to_owned()),
        ("NOMAD_ADDR", format!("http://127.0.0.1:{port}")),
        ("BACKEND_TIMEOUT", "500ms".to_owned()),
    ];
    let (mut c, index) = discovery(&mut stack, None, &env, ServingStatus::NotServing).await;
    let err = c
        .list_clients(ListClientsRequest::default())
        .await
        .expect_err("no list yet");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("nomad backend") && err.message().contains("NOMAD_ADDR"),
        "{}",
        err.message()
    );
    assert!(log_of(&stack, index).contains("NOMAD_ADDR"));

    // Nomad comes up at that address: SERVING, without a restart.
    let nomad = NomadStandIn::start_on(port).await.expect("nomad stand-in");
    nomad.upsert(Node::numbered(1));
    service(&stack, index)
        .wait_for(ServingStatus::Serving)
        .await;
    assert_eq!(list(&mut c, false, false).await.clients.len(), 1);

    // A NOMAD_ADDR that is no URL, an unreadable static file: started, NOT_SERVING, named.
    for (env, setting) in [
        (
            vec![
                ("DISCOVERY_BACKEND", "nomad".to_owned()),
                ("NOMAD_ADDR", "127.0.0.1:4646".to_owned()),
            ],
            "NOMAD_ADDR=127.0.0.1:4646",
        ),
        (
            vec![
                ("DISCOVERY_BACKEND", "static".to_owned()),
                (
                    "STATIC_FILE",
                    stack.dir().join("missing.yaml").display().to_string(),
                ),
            ],
            "STATIC_FILE=",
        ),
    ] {
        let (_, index) = discovery(&mut stack, None, &env, ServingStatus::NotServing).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !log_of(&stack, index).contains(setting) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            log_of(&stack, index).contains(setting),
            "{setting} not named in\n{}",
            tail(&service(&stack, index).log)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nomad_acl_tokens_are_sent_and_a_refusal_is_named() {
    let mut stack = TestStack::new();
    let nomad = NomadStandIn::start().await.expect("nomad stand-in");
    nomad.upsert(Node::numbered(1));
    nomad.set_token(Some("s3cret"));
    let mut env = nomad_env(&nomad, 500);
    let (mut c, _) = discovery(&mut stack, None, &env, ServingStatus::NotServing).await;
    let err = c
        .list_clients(ListClientsRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("NOMAD_TOKEN") && err.message().contains("403"),
        "{}",
        err.message()
    );

    env.push(("NOMAD_TOKEN", "s3cret".into()));
    let (mut c, _) = discovery(&mut stack, None, &env, ServingStatus::Serving).await;
    assert_eq!(list(&mut c, true, false).await.clients.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn get_client_finds_a_client_and_names_bad_input() {
    let mut stack = TestStack::new();
    let nomad = NomadStandIn::start().await.expect("nomad stand-in");
    let node = Node::numbered(3);
    nomad.upsert(node.clone());
    let (mut c, _) = discovery(
        &mut stack,
        None,
        &nomad_env(&nomad, 500),
        ServingStatus::Serving,
    )
    .await;
    let found = c
        .get_client(GetClientRequest {
            id: node.id.clone(),
        })
        .await
        .expect("GetClient")
        .into_inner()
        .client
        .expect("client");
    assert_eq!(found.name, "client-3");
    assert_eq!(found.datacenter, node.datacenter);

    let err = c
        .get_client(GetClientRequest { id: "nope".into() })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"nope\""), "{}", err.message());
    let err = c
        .get_client(GetClientRequest { id: String::new() })
        .await
        .expect_err("empty");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("id:"), "{}", err.message());
}

/// The next event of a watch, within a few seconds.
async fn next_event(events: &mut Streaming<WatchClientsResponse>) -> (ClientEventType, NodeClient) {
    let event = tokio::time::timeout(Duration::from_secs(15), events.message())
        .await
        .expect("an event in time")
        .expect("stream open")
        .expect("an event");
    (
        ClientEventType::try_from(event.event_type).expect("event type"),
        event.client.expect("client"),
    )
}

fn write_static(path: &Path, clients: &[(&str, &str)]) {
    let mut text = String::from("clients:\n");
    for (id, status) in clients {
        text.push_str(&format!(
            "  - id: {id}\n    address: 127.1.0.{}:4646\n    status: {status}\n",
            id.len()
        ));
    }
    // Written aside and renamed, as editors and config management do.
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, text).expect("write");
    std::fs::rename(&aside, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_static_file_is_read_again_when_it_changes_and_watchers_see_each_change() {
    let mut stack = TestStack::new();
    let file = stack.dir().join("clients.yaml");
    write_static(&file, &[("a", "ready"), ("bb", "ready")]);
    let env = vec![
        ("DISCOVERY_BACKEND", "static".to_owned()),
        ("STATIC_FILE", file.display().to_string()),
    ];
    let (mut c, _) = discovery(&mut stack, None, &env, ServingStatus::Serving).await;
    let mut events = c
        .watch_clients(WatchClientsRequest {})
        .await
        .expect("WatchClients")
        .into_inner();
    let mut first = [next_event(&mut events).await, next_event(&mut events).await];
    first.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    assert_eq!(first[0].0, ClientEventType::Added);
    assert_eq!(first[0].1.id, "a");
    assert_eq!(first[1].1.id, "bb");
    assert_eq!(first[1].1.tree_builder_address, "127.1.0.2:50052");

    // bb goes down, a leaves, ccc arrives: seen without anyone asking for a refresh.
    write_static(&file, &[("bb", "down"), ("ccc", "ready")]);
    let mut seen = BTreeMap::new();
    for _ in 0..3 {
        let (kind, client) = next_event(&mut events).await;
        seen.insert(client.id.clone(), (kind, client.ready));
    }
    assert_eq!(seen["a"].0, ClientEventType::Removed);
    assert_eq!(seen["bb"], (ClientEventType::Changed, false));
    assert_eq!(seen["ccc"], (ClientEventType::Added, true));
    let answer = list(&mut c, false, false).await;
    let ids: Vec<&str> = answer.clients.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["bb", "ccc"]);

    // A late watcher starts from the list as it is now.
    let mut late = c
        .watch_clients(WatchClientsRequest {})
        .await
        .expect("WatchClients")
        .into_inner();
    let mut ids = vec![
        next_event(&mut late).await.1.id,
        next_event(&mut late).await.1.id,
    ];
    ids.sort();
    assert_eq!(ids, ["bb", "ccc"]);

    // A file that no longer parses: the list is kept, STALE with the error.
    std::fs::write(&file, "clients: [ {id: x, adress: y} ]\n").expect("write");
    let stale = list(&mut c, true, false).await;
    assert_eq!(state(&stale), CacheState::Stale);
    assert_eq!(stale.clients.len(), 2);
    assert!(stale.error.contains("adress"), "{}", stale.error);
}

async fn kubernetes_stand_in(stack: &TestStack, nodes: usize) -> (KubernetesStandIn, String) {
    let kube = KubernetesStandIn::start()
        .await
        .expect("kubernetes stand-in");
    for n in 0..nodes {
        kube.upsert_node(&KubeNode::numbered(n));
    }
    kube.set_token(Some("t0ken"));
    let config = kube
        .write_kubeconfig(stack.dir(), Some("t0ken"), "merkle")
        .expect("kubeconfig");
    (kube, config.display().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_nodes_refresh_incrementally_and_a_watch_survives_410_gone() {
    let mut stack = TestStack::new();
    let cache = with_cache(&mut stack).await;
    let (kube, kubeconfig) = kubernetes_stand_in(&stack, 50).await;
    let env = vec![
        ("DISCOVERY_BACKEND", "kubernetes".to_owned()),
        ("KUBECONFIG", kubeconfig),
        ("PAGE_SIZE", "20".to_owned()),
        ("WATCH_WAIT", "2s".to_owned()),
        ("BACKEND_TIMEOUT", "2s".to_owned()),
    ];
    let (mut c, _) = discovery(&mut stack, Some(&cache), &env, ServingStatus::Serving).await;
    // The health probe read the list: 3 metadata pages and 50 nodes in full.
    assert_eq!(kube.calls().list, 3);
    assert_eq!(kube.calls().get, 50);
    let answer = list(&mut c, false, false).await;
    assert_eq!(state(&answer), CacheState::Hot);
    let node = answer
        .clients
        .iter()
        .find(|n| n.id == "node-4")
        .expect("node-4");
    assert_eq!(node.address, "127.1.0.5:10250");
    assert_eq!(node.tree_builder_address, "127.1.0.5:50052");
    assert_eq!(node.datacenter, "zone-1");
    assert!(node.ready);

    // Two nodes change: a refresh lists 3 pages and gets those 2.
    kube.reset_calls();
    let mut changed = KubeNode::numbered(7);
    changed.ready = false;
    kube.upsert_node(&changed);
    let mut marked = KubeNode::numbered(8);
    marked
        .annotations
        .insert("merkle_tree_builder".into(), "127.1.8.8:7000".into());
    kube.upsert_node(&marked);
    let refreshed = list(&mut c, true, false).await;
    assert_eq!(counts(&refreshed), (0, 2, 48, 0, 3 + 2));
    assert_eq!(kube.calls().get, 2);
    let by_id = |answer: &ListClientsResponse, id: &str| {
        answer
            .clients
            .iter()
            .find(|n| n.id == id)
            .cloned()
            .expect("listed")
    };
    assert!(!by_id(&refreshed, "node-7").ready);
    assert_eq!(by_id(&refreshed, "node-7").status, "not-ready");
    assert_eq!(
        by_id(&refreshed, "node-8").tree_builder_address,
        "127.1.8.8:7000"
    );

    // A watch: every node, then changes as the API server reports them.
    let mut events = c
        .watch_clients(WatchClientsRequest {})
        .await
        .expect("WatchClients")
        .into_inner();
    for _ in 0..50 {
        assert_eq!(next_event(&mut events).await.0, ClientEventType::Added);
    }
    kube.upsert_node(&KubeNode::numbered(50));
    let (kind, client) = next_event(&mut events).await;
    assert_eq!(
        (kind, client.id.as_str()),
        (ClientEventType::Added, "node-50")
    );
    kube.remove_node("node-3");
    let (kind, client) = next_event(&mut events).await;
    assert_eq!(
        (kind, client.id.as_str()),
        (ClientEventType::Removed, "node-3")
    );

    // The history is compacted: the next watch (each lasts WATCH_WAIT) gets 410 Gone, lists
    // again, and goes on from the new version.
    kube.compact();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while kube.calls().gone == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        kube.calls().gone >= 1,
        "a watch from a compacted version got 410"
    );
    kube.upsert_node(&KubeNode::numbered(51));
    let (kind, client) = next_event(&mut events).await;
    assert_eq!(
        (kind, client.id.as_str()),
        (ClientEventType::Added, "node-51")
    );

    // Credentials refused: STALE, the error names the 401.
    kube.set_token(Some("rotated"));
    let stale = list(&mut c, true, false).await;
    assert_eq!(state(&stale), CacheState::Stale);
    assert!(stale.error.contains("401"), "{}", stale.error);
    // The API server answering 503: kube retries it with backoff, until BACKEND_TIMEOUT ends
    // the call; STALE too.
    kube.set_token(Some("t0ken"));
    kube.set_unavailable(true);
    let stale = list(&mut c, true, false).await;
    assert_eq!(state(&stale), CacheState::Stale);
    assert!(
        stale.error.contains("Kubernetes API at")
            && (stale.error.contains("503") || stale.error.contains("BACKEND_TIMEOUT")),
        "{}",
        stale.error
    );
    kube.set_unavailable(false);
    assert_eq!(
        state(&list(&mut c, true, false).await),
        CacheState::Refreshed
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_pods_are_clients_by_the_node_they_run_on() {
    let mut stack = TestStack::new();
    let (kube, kubeconfig) = kubernetes_stand_in(&stack, 0).await;
    let labels = BTreeMap::from([("app".to_owned(), "tree-builder".to_owned())]);
    for n in 0..3 {
        kube.upsert_pod(&KubePod {
            namespace: "merkle".into(),
            name: format!("tree-builder-{n}x"),
            node_name: format!("node-{n}"),
            ip: format!("127.1.4.{}", n + 1),
            ready: n != 2,
            labels: labels.clone(),
        });
    }
    // Another app's pod, and one elsewhere: not selected.
    kube.upsert_pod(&KubePod {
        namespace: "merkle".into(),
        name: "other".into(),
        node_name: "node-0".into(),
        ip: "127.1.4.9".into(),
        ready: true,
        labels: BTreeMap::new(),
    });
    let env = vec![
        ("DISCOVERY_BACKEND", "kubernetes".to_owned()),
        ("KUBECONFIG", kubeconfig),
        ("KUBERNETES_RESOURCE", "pods".to_owned()),
        ("KUBERNETES_LABEL_SELECTOR", "app=tree-builder".to_owned()),
    ];
    let (mut c, _) = discovery(&mut stack, None, &env, ServingStatus::Serving).await;
    let answer = list(&mut c, true, false).await;
    let clients: Vec<(String, String, String, bool)> = answer
        .clients
        .iter()
        .map(|n| {
            (
                n.id.clone(),
                n.name.clone(),
                n.tree_builder_address.clone(),
                n.ready,
            )
        })
        .collect();
    assert_eq!(
        clients,
        vec![
            (
                "node-0".into(),
                "tree-builder-0x".into(),
                "127.1.4.1:50052".into(),
                true
            ),
            (
                "node-1".into(),
                "tree-builder-1x".into(),
                "127.1.4.2:50052".into(),
                true
            ),
            (
                "node-2".into(),
                "tree-builder-2x".into(),
                "127.1.4.3:50052".into(),
                false
            ),
        ]
    );
    // A pod's list carries its details: one call, nothing fetched one by one.
    assert_eq!(counts(&answer).4, 1);
    assert_eq!(kube.calls().get, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_the_lists_are_still_right_from_the_backend() {
    let mut stack = TestStack::new();
    let cache = with_cache(&mut stack).await;
    let nomad = NomadStandIn::start().await.expect("nomad stand-in");
    for n in 0..30 {
        nomad.upsert(Node::numbered(n));
    }
    stack.redis.as_mut().expect("redis").stop();
    let (mut c, _) = discovery(
        &mut stack,
        Some(&cache),
        &nomad_env(&nomad, 10),
        ServingStatus::Serving,
    )
    .await;
    assert_eq!(list(&mut c, false, false).await.clients.len(), 30);
    nomad.upsert(Node {
        status: "down".into(),
        ..Node::numbered(2)
    });
    let answer = list(&mut c, true, false).await;
    assert_eq!(counts(&answer), (0, 1, 29, 0, 3 + 1));
    let two = answer
        .clients
        .iter()
        .find(|n| n.name == "client-2")
        .expect("client-2");
    assert!(!two.ready);
    assert_eq!(state(&list(&mut c, false, false).await), CacheState::Hot);
}

#[tokio::test(flavor = "multi_thread")]
async fn nomad_blocking_queries_drive_watch_clients() {
    let mut stack = TestStack::new();
    let (nomad, mut c, _) = nomad_fleet(&mut stack, 3).await;
    let mut events = c
        .watch_clients(WatchClientsRequest {})
        .await
        .expect("WatchClients")
        .into_inner();
    for _ in 0..3 {
        assert_eq!(next_event(&mut events).await.0, ClientEventType::Added);
    }
    nomad.reset_calls();
    nomad.upsert(Node {
        status: "down".into(),
        ..Node::numbered(1)
    });
    let (kind, client) = next_event(&mut events).await;
    assert_eq!(
        (kind, client.name.as_str()),
        (ClientEventType::Changed, "client-1")
    );
    assert!(!client.ready);
    nomad.remove(&Node::numbered(0).id);
    let (kind, client) = next_event(&mut events).await;
    assert_eq!(
        (kind, client.name.as_str()),
        (ClientEventType::Removed, "client-0")
    );
    // Each change was seen by a blocking query (the first one began before the counters were
    // reset), then refreshed: two lists, and only the changed node fetched.
    let calls = nomad.calls();
    assert!(calls.blocking >= 1, "{calls:?}");
    assert_eq!((calls.list, calls.detail), (2, 1), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nomad_over_mutual_tls_with_nomads_own_variables() {
    let mut stack = TestStack::new();
    let pki = integration_tests::make_certificates(stack.dir());
    let read = |name: &str| std::fs::read(pki.join(name)).expect("read pem");
    let nomad = NomadStandIn::start_tls(&merkle_stand_ins::Tls {
        cert_pem: read("server.pem"),
        key_pem: read("server.key"),
        client_ca_pem: Some(read("ca.pem")),
    })
    .await
    .expect("nomad stand-in over TLS");
    nomad.upsert(Node::numbered(1));
    let path = |name: &str| pki.join(name).display().to_string();
    let mut env = vec![
        ("DISCOVERY_BACKEND", "nomad".to_owned()),
        ("NOMAD_ADDR", nomad.addr()),
        ("BACKEND_TIMEOUT", "2s".to_owned()),
    ];
    assert!(nomad.addr().starts_with("https://127.0.0.1:"));

    // Nomad's certificate is not trusted without NOMAD_CACERT.
    let (mut c, _) = discovery(&mut stack, None, &env, ServingStatus::NotServing).await;
    let err = c
        .list_clients(ListClientsRequest::default())
        .await
        .expect_err("untrusted");
    assert!(
        err.message().contains("NOMAD_ADDR=https://") && err.message().contains("certificate"),
        "{}",
        err.message()
    );

    // Trusted, but no client certificate: the handshake is refused.
    env.push(("NOMAD_CACERT", path("ca.pem")));
    let (mut c, _) = discovery(&mut stack, None, &env, ServingStatus::NotServing).await;
    let err = c
        .list_clients(ListClientsRequest::default())
        .await
        .expect_err("no client certificate");
    assert_eq!(err.code(), Code::Unavailable);

    // Mutual TLS: served.
    env.push(("NOMAD_CLIENT_CERT", path("client.pem")));
    env.push(("NOMAD_CLIENT_KEY", path("client.key")));
    let (mut c, _) = discovery(&mut stack, None, &env, ServingStatus::Serving).await;
    let answer = list(&mut c, true, false).await;
    assert_eq!(answer.clients.len(), 1);
    assert_eq!(answer.clients[0].name, "client-1");
}

/// Changed events on `events` until none came for `quiet`: the ids of the changed clients.
async fn changed_until_quiet(
    events: &mut Streaming<WatchClientsResponse>,
    quiet: Duration,
) -> std::collections::HashSet<String> {
    let mut ids = std::collections::HashSet::new();
    while let Ok(event) = tokio::time::timeout(quiet, events.message()).await {
        let event = event.expect("stream open").expect("an event");
        if event.event_type == ClientEventType::Changed as i32 {
            ids.insert(event.client.expect("client").id);
        }
    }
    ids
}

/// A watch of `c`'s clients, past the first `nodes` (each ADDED).
async fn watch_past_added(c: &mut Client, nodes: usize) -> Streaming<WatchClientsResponse> {
    let mut events = c
        .watch_clients(WatchClientsRequest {})
        .await
        .expect("WatchClients")
        .into_inner();
    for _ in 0..nodes {
        assert_eq!(next_event(&mut events).await.0, ClientEventType::Added);
    }
    events
}

/// Lets `churn` run for 3 s, stops it, and checks that each node it changed reached the
/// watcher as one CHANGED event; returns how many it changed.
async fn churn_reaches_watcher(
    churn: merkle_stand_ins::Churn,
    events: &mut Streaming<WatchClientsResponse>,
) -> u64 {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let changed = churn.stop().await;
    let seen = changed_until_quiet(events, Duration::from_secs(3)).await;
    assert!(changed >= 30, "the churn changed {changed} nodes in 3 s");
    assert_eq!(
        seen.len() as u64,
        changed,
        "every changed node was seen once"
    );
    changed
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_fleets_churn_reaches_watchers_with_one_detail_per_changed_node() {
    let mut stack = TestStack::new();
    // Nomad: 1,000 nodes, 6% of them changed over 3 s (one every 50 ms), followed by
    // blocking queries.
    let (nomad, mut c, _) = nomad_fleet(&mut stack, 1000).await;
    let mut events = watch_past_added(&mut c, 1000).await;
    nomad.reset_calls();
    let changed =
        churn_reaches_watcher(nomad.churn(6.0, Duration::from_secs(3)), &mut events).await;
    let calls = nomad.calls();
    assert_eq!(
        calls.detail, changed,
        "one detail per changed node: {calls:?}"
    );
    let listed = list(&mut c, false, false).await;
    let churned = listed
        .clients
        .iter()
        .filter(|n| n.labels.contains_key("merkle_churn"))
        .count();
    assert_eq!(churned as u64, changed, "the list holds every change");

    // Kubernetes: the same over a watch.
    let (kube, kubeconfig) = kubernetes_stand_in(&stack, 500).await;
    let env = vec![
        ("DISCOVERY_BACKEND", "kubernetes".to_owned()),
        ("KUBECONFIG", kubeconfig),
        ("BACKEND_TIMEOUT", "2s".to_owned()),
    ];
    let (mut k, _) = discovery(&mut stack, None, &env, ServingStatus::Serving).await;
    let mut events = watch_past_added(&mut k, 500).await;
    churn_reaches_watcher(kube.churn(12.0, Duration::from_secs(3)), &mut events).await;
}
