//! Health follows real dependencies: DbSync with PostgreSQL, Cache with Redis, without restarts.

use integration_tests::{ServingStatus, TestStack, free_port};

#[tokio::test(flavor = "multi_thread")]
async fn db_sync_health_follows_postgres_without_restart() {
    let mut stack = TestStack::new();
    // DbSync starts first, pointed at a port where PostgreSQL is not running yet.
    let pg_port = free_port().expect("free port");
    let url = format!("postgres://merkle@127.0.0.1:{pg_port}/merkle");
    let pid = {
        let db_sync = stack.start_service("db-sync", &[("DATABASE_URL", url)]);
        db_sync.wait_for(ServingStatus::NotServing).await;
        db_sync.process.pid()
    };

    stack.start_postgres_on(pg_port).await;
    stack
        .service_mut("db-sync")
        .wait_for(ServingStatus::Serving)
        .await;

    // Its migrations ran once PostgreSQL appeared.
    let pg = stack.postgres.as_ref().expect("started");
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let applied: i64 = client
        .query_one(
            "SELECT count(*) FROM schema_migrations WHERE component = 'db-sync'",
            &[],
        )
        .await
        .expect("schema_migrations exists")
        .get(0);
    assert!(applied >= 1);
    drop(client);

    stack.postgres.as_mut().expect("started").stop();
    stack
        .service_mut("db-sync")
        .wait_for(ServingStatus::NotServing)
        .await;

    stack
        .postgres
        .as_mut()
        .expect("started")
        .start_again()
        .await
        .expect("restart PostgreSQL");
    let db_sync = stack.service_mut("db-sync");
    db_sync.wait_for(ServingStatus::Serving).await;
    assert_eq!(db_sync.process.pid(), pid);
    assert!(
        db_sync.process.try_exit_status().is_none(),
        "DbSync restarted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_health_follows_redis_without_restart() {
    let mut stack = TestStack::new();
    stack.start_serving("cache").await;

    stack.redis.as_mut().expect("started").stop();
    stack
        .service_mut("cache")
        .wait_for(ServingStatus::NotServing)
        .await;

    stack
        .redis
        .as_mut()
        .expect("started")
        .start_again()
        .await
        .expect("restart Redis");
    let cache = stack.service_mut("cache");
    cache.wait_for(ServingStatus::Serving).await;
    assert!(cache.process.try_exit_status().is_none(), "Cache restarted");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_apply_once_when_replicas_start_together() {
    let mut stack = TestStack::new();
    stack.start_postgres().await;
    stack.start_service("db-sync", &[]);
    stack.start_service("db-sync", &[]);
    stack.start_service("db-sync", &[]);
    // Each replica reports SERVING only after the schema is current.
    for db_sync in stack.services() {
        db_sync.wait_for(ServingStatus::Serving).await;
    }
    let pg = stack.postgres.as_ref().expect("started");
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT version FROM schema_migrations WHERE component = 'db-sync' ORDER BY version",
            &[],
        )
        .await
        .expect("query");
    let versions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let expected: Vec<i64> = (1..=versions.len() as i64).collect();
    assert_eq!(versions, expected);
}
