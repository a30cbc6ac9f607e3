//! Self-test of the PostgreSQL test harness in `tests/common/pg.rs`.

use crate::common;

use common::pg::{admin_url, PrivateServer, TestDb};

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

async fn table_exists(client: &tokio_postgres::Client, table: &str) -> bool {
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0)
}

async fn database_exists(name: &str) -> bool {
    let admin = connect(&admin_url()).await;
    admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn test_dbs_are_distinct() {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    assert_ne!(a.name, b.name);
    assert_ne!(a.url, b.url);
    assert!(a.name.starts_with("ofc_test_"), "{}", a.name);

    let ca = a.connect().await;
    let cb = connect(&b.url).await;
    let current: String = ca
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, a.name);

    ca.batch_execute("CREATE TABLE only_in_a (id int)")
        .await
        .unwrap();
    assert!(table_exists(&ca, "only_in_a").await);
    assert!(!table_exists(&cb, "only_in_a").await);
}

#[tokio::test]
async fn test_db_is_dropped_on_drop() {
    let db = TestDb::new().await;
    let name = db.name.clone();
    // An open connection must not prevent the drop.
    let client = db.connect().await;
    client
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    assert!(database_exists(&name).await);
    drop(db);
    assert!(!database_exists(&name).await);
}

#[test]
fn test_db_drop_without_runtime() {
    let db = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(TestDb::new());
    let name = db.name.clone();
    drop(db);
    let exists = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(database_exists(&name));
    assert!(!exists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_test_dbs_in_parallel() {
    let tasks: Vec<_> = (0..8).map(|_| tokio::spawn(TestDb::new())).collect();
    let mut names = Vec::new();
    let mut dbs = Vec::new();
    for t in tasks {
        let db = t.await.unwrap();
        names.push(db.name.clone());
        dbs.push(db);
    }
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 8);
}

#[tokio::test]
async fn private_server_start_restart_drop() {
    let server = PrivateServer::new();
    let dir = server.dir().to_path_buf();
    assert!(dir.exists());
    assert!(server.is_running());
    assert_ne!(server.url(), admin_url());

    let client = connect(&server.url()).await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    server.restart();
    // The old connection was terminated by the restart.
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    let client = connect(&server.url()).await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    server.stop();
    assert!(!server.is_running());
    assert!(
        tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
            .await
            .is_err()
    );
    server.start();
    connect(&server.url()).await;

    drop(server);
    assert!(!dir.exists(), "{} still exists", dir.display());
}
