//! The web console in a real browser: Debian's chromium, driven over WebDriver (chromedriver,
//! the W3C protocol spoken here with plain HTTP), against the real services and the real
//! `merklectl console`. The overview lists the sources; a triggered build's progress updates
//! on the source page without a reload; the diff page lists the changed path; a stored tree is
//! browsed and an entry's proof bundle downloaded and verified; the log page shows the
//! checkpoint; a console without an operator's token offers no Trigger and refuses one. The
//! drift page shows the node that differs in a real three-node local fleet (`merklectl up
//! --fleet-nodes 2`).
//!
//! With `CONSOLE_SCREENSHOTS=DIR` the pages' screenshots are written there (the README's).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use integration_tests::{ManagedProcess, TestStack, binary, credentials, free_port, run_merklectl};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// An HTTP request on loopback: (status, body).
async fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        // Plain HTTP only, but reqwest's TLS stack wants a provider chosen.
        merkle_shared::tls::install_crypto_provider();
        reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client")
    });
    let mut request = client.request(method.parse().expect("method"), url);
    if !body.is_empty() {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// One WebDriver session of headless chromium.
struct Browser {
    driver: String,
    session: String,
    _chromedriver: ManagedProcess,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start(dir: &Path) -> Browser {
        let port = free_port().expect("port");
        let mut command = Command::new("chromedriver");
        command.arg(format!("--port={port}")).stdin(Stdio::null());
        let process = ManagedProcess::spawn(
            "chromedriver",
            command,
            Signal::SIGTERM,
            &dir.join("chromedriver.log"),
        )
        .expect("chromedriver (scripts/install-deps.sh installs chromium-driver)");
        let driver = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1280,900",
                         format!("--user-data-dir={}", dir.join("chromium").display())],
            }
        }}});
        let (status, body) = http(
            "POST",
            &format!("{driver}/session"),
            &[],
            &capabilities.to_string(),
        )
        .await;
        assert_eq!(status, 200, "a WebDriver session: {body}");
        let value: Value = serde_json::from_str(&body).expect("json");
        let session = value["value"]["sessionId"]
            .as_str()
            .expect("session id")
            .to_owned();
        Browser {
            driver,
            session,
            _chromedriver: process,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.driver, self.session);
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (status, text) = http(method, &url, &[], &body).await;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert_eq!(status, 200, "{method} {path}: {text}");
        value["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    /// The element matching `css`, waited for up to 10 s.
    async fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let url = format!("{}/session/{}/element", self.driver, self.session);
            let (status, text) = http(
                "POST",
                &url,
                &[],
                &json!({"using": "css selector", "value": css}).to_string(),
            )
            .await;
            if status == 200 {
                let value: Value = serde_json::from_str(&text).expect("json");
                return value["value"][ELEMENT]
                    .as_str()
                    .expect("element")
                    .to_owned();
            }
            assert!(Instant::now() < deadline, "no element {css}: {text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text(&self, css: &str) -> String {
        let element = self.find(css).await;
        self.call("GET", &format!("/element/{element}/text"), Value::Null)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the text of `css` satisfies `ok` (up to 30 s); returns it.
    async fn text_until(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text(css).await;
            if ok(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never matched; it says {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Loads `url` again until the text of `css` satisfies `ok` (up to 30 s): for a page that
    /// shows what it read when it was served, as an operator would reload it.
    async fn text_until_reloaded(&self, url: &str, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.go(url).await;
            let text = self.text(css).await;
            if ok(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css} of {url} never matched; it says {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call("POST", &format!("/element/{element}/click"), json!({}))
            .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// With CONSOLE_SCREENSHOTS set, the page as a PNG there.
    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("CONSOLE_SCREENSHOTS") else {
            return;
        };
        let png = self.call("GET", "/screenshot", Value::Null).await;
        let bytes = STANDARD.decode(png.as_str().expect("base64")).expect("png");
        std::fs::write(Path::new(&dir).join(format!("console-{name}.png")), bytes).expect("write");
    }
}

/// How a console is started and which identity it reads with.
#[derive(Clone, Copy, PartialEq)]
enum Launch {
    /// Flags, the reader's token and the operator's (Trigger build).
    OperatorFlags,
    /// The chart's way: environment variables only, the reader's token.
    ReaderEnv,
    /// The chart's way with auth.enabled=false: no token at all.
    NoTokenEnv,
}

/// `merklectl health --http URL`, the chart's probe of the console: whether it exits 0.
fn probe(url: &str) -> bool {
    Command::new(binary("merklectl"))
        .args(["health", "--http", url])
        .output()
        .expect("merklectl health")
        .status
        .success()
}

/// What a console reads: the four services it calls, the tokens it may use, and where its log
/// goes.
struct Target {
    /// Scheduler, DbSync, Cache and Discovery, in that order.
    uris: [String; 4],
    reader: PathBuf,
    operator: PathBuf,
    dir: PathBuf,
}

impl Target {
    /// The services of a test stack, with the test credentials.
    fn of(stack: &mut TestStack) -> Target {
        Target {
            uris: ["scheduler", "db-sync", "cache", "discovery"]
                .map(|name| stack.service_mut(name).uri()),
            reader: credentials().token_file("reader"),
            operator: credentials().token_file("operator"),
            dir: stack.dir().to_path_buf(),
        }
    }
}

/// Starts `merklectl console` on a free port; returns its URL and the process once the
/// chart's probe passes.
async fn console(target: &Target, launch: Launch) -> (String, ManagedProcess) {
    let port = free_port().expect("port");
    let mut command = Command::new(binary("merklectl"));
    command.arg("console").env_remove("MERKLE_TOKEN_FILE");
    let services = ["scheduler", "db-sync", "cache", "discovery"];
    if launch == Launch::OperatorFlags {
        command.args(["--listen", &format!("127.0.0.1:{port}")]);
        for (service, uri) in services.iter().zip(&target.uris) {
            command.args([format!("--{service}-addr"), uri.clone()]);
        }
        command
            .arg("--reader-token-file")
            .arg(&target.reader)
            .arg("--operator-token-file")
            .arg(&target.operator);
    } else {
        command.env("CONSOLE_LISTEN_ADDR", format!("127.0.0.1:{port}"));
        for (service, uri) in services.iter().zip(&target.uris) {
            command.env(
                format!("{}_ADDR", service.to_uppercase().replace('-', "_")),
                uri,
            );
        }
        if launch == Launch::ReaderEnv {
            command.env("CONSOLE_READER_TOKEN_FILE", &target.reader);
        } else {
            command.env("CONSOLE_NO_TOKEN", "true");
        }
    }
    let log = target.dir.join(format!("console-{port}.log"));
    let process =
        ManagedProcess::spawn("console", command, Signal::SIGTERM, &log).expect("console");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !probe(&format!("{url}/healthz")) {
        assert!(
            Instant::now() < deadline,
            "the console did not become healthy: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (url, process)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_sources_live_builds_diffs_trees_and_the_log_in_a_real_browser() {
    let mut stack = TestStack::new();
    // The history signed, as `merklectl up` signs it: a downloaded proof bundle checks out.
    let keys = stack.dir().join("keys");
    std::fs::create_dir_all(&keys).expect("mkdir");
    let private = merklectl::history::ensure_signing_key(&keys).expect("key");
    let log_key = {
        use ed25519_dalek::pkcs8::DecodePrivateKey as _;
        let pem = std::fs::read_to_string(&private).expect("key");
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).expect("pem");
        signed_note::new_ed25519_verifier_key("merkle-mesh.local/log", &key.verifying_key())
    };
    stack.set_service_env("db-sync", "SIGNING_KEY_FILE", private.display().to_string());
    stack.start_all().await;
    let scheduler = stack.service_mut("scheduler").uri();
    // A source with a snapshot, then a file changed (the next build stores a second one).
    let docs = stack.dir().join("docs");
    std::fs::create_dir_all(docs.join("guide")).expect("mkdir");
    for n in 0..300 {
        std::fs::write(
            docs.join(format!("guide/page-{n:03}.md")),
            format!("page {n}"),
        )
        .expect("write");
    }
    let docs_arg = docs.to_str().expect("utf-8");
    let (code, out, err) =
        run_merklectl(&["source", "add", "docs", docs_arg, "--addr", &scheduler]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = run_merklectl(&["build", "docs", "--addr", &scheduler]);
    assert_eq!(code, Some(0), "{out}{err}");
    std::fs::write(docs.join("guide/page-042.md"), "edited").expect("write");

    let (url, _console) = console(&Target::of(&mut stack), Launch::OperatorFlags).await;
    let browser = Browser::start(stack.dir()).await;

    // The overview.
    browser.go(&format!("{url}/")).await;
    let sources = browser.text("#sources").await;
    assert!(
        sources.contains("docs") && sources.contains("SUCCEEDED_CHANGED"),
        "{sources}"
    );
    assert!(browser.text("#fleet").await.contains("1 ready"));
    // Its last change and changes per day (DbSync's change activity): one snapshot, today.
    assert!(!browser.text("#sources td.changed").await.contains("never"));
    let spark = browser
        .script("return document.querySelector('#sources svg.spark').getAttribute('aria-label');")
        .await;
    assert_eq!(spark, json!("1 changes in 14 days"));
    browser.screenshot("overview").await;

    // A build triggered from the source page, followed live: the page is not reloaded (a
    // marker set on it survives) while its state and file count change.
    browser.go(&format!("{url}/sources/docs")).await;
    browser.click("#trigger").await;
    browser.find("#live").await;
    browser.script("window.notReloaded = true;").await;
    let state = browser
        .text_until("#live .state", |s| s.starts_with("SUCCEEDED"))
        .await;
    assert_eq!(state, "SUCCEEDED_CHANGED");
    assert!(browser.text("#live .files").await.contains("of 300 files"));
    assert_eq!(browser.text("#live .root").await.len(), 64);
    assert_eq!(
        browser.script("return window.notReloaded === true;").await,
        json!(true),
        "the page reloaded"
    );
    browser.screenshot("source").await;
    // Reloaded, the page counts today's two changes among its 14 days.
    browser.go(&format!("{url}/sources/docs")).await;
    let days = browser
        .script(
            "return [...document.querySelectorAll('#per-day tr')]\
             .map(r => r.cells[1].textContent.trim());",
        )
        .await;
    let days: Vec<&str> = days
        .as_array()
        .expect("rows")
        .iter()
        .map(|d| d.as_str().expect("text"))
        .collect();
    assert_eq!(days.len(), 14, "{days:?}");
    assert_eq!(days[13], "2", "{days:?}");

    // The diff of the two snapshots.
    browser.go(&format!("{url}/sources/docs")).await;
    browser.click("a.diff").await;
    let changes = browser.text("#changes").await;
    assert!(
        changes.contains("MODIFIED") && changes.contains("guide/page-042.md"),
        "{changes}"
    );
    assert!(browser.text("#change-count").await.starts_with("1 changed"));
    browser.screenshot("diff").await;

    // The newest snapshot's tree, browsed down to the edited file, and its proof bundle.
    browser.go(&format!("{url}/sources/docs")).await;
    browser.click("a.browse").await;
    browser.text_until("#crumbs", |s| s == "docs").await;
    browser.click("a.dir").await;
    let entries = browser.text_until("#crumbs", |s| s == "docs / guide").await;
    assert_eq!(entries, "docs / guide");
    let rows = browser.text("#entries").await;
    assert!(
        rows.contains("page-042.md") && rows.contains("page-299.md"),
        "{rows}"
    );
    let proof_href = browser
        .script(
            "return [...document.querySelectorAll('tr.entry')]\
             .find(r => r.textContent.includes('page-042.md'))\
             .querySelector('a.proof').getAttribute('href');",
        )
        .await;
    let proof_href = proof_href.as_str().expect("a proof link").to_owned();
    browser.screenshot("tree").await;
    let (status, bundle) = http("GET", &format!("{url}{proof_href}"), &[], "").await;
    assert_eq!(status, 200, "{bundle}");

    // The log: every record so far (the two docs snapshots) once checkpointed
    // (within LOG_INTERVAL of the last commit; the page shows the checkpoint it was served).
    let size = browser
        .text_until_reloaded(&format!("{url}/log"), "#log-size", |s| {
            s.contains("holds 2 records")
        })
        .await;
    assert!(size.contains("2"), "{size}");
    assert!(
        browser
            .text("#checkpoint")
            .await
            .starts_with("merkle-mesh.local/log\n2\n")
    );
    assert_eq!(browser.text("#verifier-key").await, log_key);
    browser.screenshot("log").await;
    // The bundle downloaded above proves page-042.md's edited content with only that key.
    let file = stack.dir().join("page-042.proof");
    std::fs::write(&file, &bundle).expect("write");
    let content = stack.dir().join("page-042-then");
    std::fs::write(&content, "edited").expect("write");
    let (code, out, err) = run_merklectl(&[
        "verify-proof",
        file.to_str().expect("utf-8"),
        "--verifier-key",
        &log_key,
        "--content",
        content.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("valid: guide/page-042.md was a file") && out.contains("in docs@2"),
        "{out}"
    );
    browser.call("DELETE", "", Value::Null).await;

    // A console with the reader's identity alone (started as the chart starts it) offers no
    // Trigger and refuses one; an operator's console refuses a trigger from another page's
    // origin.
    let (reader_url, _reader) = console(&Target::of(&mut stack), Launch::ReaderEnv).await;
    let (status, page) = http("GET", &format!("{reader_url}/sources/docs"), &[], "").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("id=\"snapshots\"") && !page.contains("Trigger build"),
        "{page}"
    );
    let (status, page) = http(
        "POST",
        &format!("{reader_url}/sources/docs/trigger"),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("reads only"), "{page}");
    let (status, page) = http(
        "POST",
        &format!("{url}/sources/docs/trigger"),
        &[("Origin", "http://evil.example")],
        "",
    )
    .await;
    assert_eq!(status, 403);
    assert!(page.contains("Origin"), "{page}");
    // Bad input names the field; an unknown source is a 404 with the service's status.
    let (status, page) = http(
        "GET",
        &format!("{url}/sources/docs/diff?from=zz&to=zz"),
        &[],
        "",
    )
    .await;
    assert!(
        status == 400 && page.contains("from: must be a root hash"),
        "{page}"
    );
    let (status, _) = http("GET", &format!("{url}/sources/nope"), &[], "").await;
    assert_eq!(status, 404);
    let (status, page) = http(
        "GET",
        &format!("{url}/sources/docs/tree?sequence=two"),
        &[],
        "",
    )
    .await;
    assert!(
        status == 400 && page.contains("sequence"),
        "{status} {page}"
    );
    for missing in [
        "tree?sequence=2&path=guide/none",
        "tree?sequence=9",
        "proof?sequence=2&path=guide/none.md",
    ] {
        let (status, page) = http("GET", &format!("{url}/sources/docs/{missing}"), &[], "").await;
        assert!(
            status == 404 && page.contains("NotFound"),
            "{missing}: {status} {page}"
        );
    }
    let (status, page) = http("GET", &format!("{url}/healthz"), &[], "").await;
    assert_eq!((status, page.as_str()), (200, "ok\n"));
    // The chart's probe fails on a page that is not there and on a port nobody serves.
    assert!(!probe(&format!("{url}/no-such-page")));
    let closed = free_port().expect("port");
    assert!(!probe(&format!("http://127.0.0.1:{closed}/healthz")));
    // A console told to send no token (for services run with AUTH_DISABLED) sends none: this
    // stack authenticates, so its pages are refused, naming why.
    let (anonymous, _anonymous) = console(&Target::of(&mut stack), Launch::NoTokenEnv).await;
    let (status, page) = http("GET", &anonymous, &[], "").await;
    assert!(
        status == 403 && page.contains("Unauthenticated"),
        "{status} {page}"
    );
}

/// The drift page on a real local fleet: `merklectl up --fleet-nodes 2` (the nodes `local`,
/// `node-1` and `node-2`, each resolving a relative path in its own folder), one fleet source,
/// node-2's copy of a file changed before the build.
#[tokio::test(flavor = "multi_thread")]
async fn the_drift_page_shows_the_node_that_differs_in_a_three_node_local_fleet() {
    let data = tempfile::tempdir().expect("temporary folder");
    let local = data.path().join("local");
    std::fs::create_dir_all(&local).expect("mkdir");
    // Five services and two fleet nodes.
    let base = integration_tests::up::free_port_block(25_000, 7);
    let child = integration_tests::up::command(data.path(), base, free_port().expect("port"))
        .args(["--fleet-nodes", "2", "--allowed-root"])
        .arg(&local)
        .spawn()
        .expect("start merklectl up");
    let _up = integration_tests::up::StopOnDrop(child);
    let addr = |offset: u16| format!("http://127.0.0.1:{}", base + offset);
    let deadline = Instant::now() + Duration::from_secs(120);
    let scheduler_port = merkle_shared::ports::SCHEDULER;
    let tree_builder = integration_tests::SERVICES
        .iter()
        .find(|s| s.name == "tree-builder")
        .expect("tree-builder")
        .grpc_name;
    let serving = integration_tests::SERVICES
        .iter()
        .map(|spec| (spec.port - scheduler_port, spec.grpc_name))
        .chain([(5, tree_builder), (6, tree_builder)]);
    for (offset, grpc_name) in serving {
        let at = ([127, 0, 0, 1], base + offset).into();
        let remaining = deadline.saturating_duration_since(Instant::now());
        integration_tests::wait_for_status(
            at,
            grpc_name,
            integration_tests::ServingStatus::Serving,
            remaining,
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {}",
                std::fs::read_to_string(data.path().join("merklectl.stderr")).unwrap_or_default()
            )
        });
    }
    // The same site on the three nodes, but node-2's index.html.
    let stack_dir = data.path().join("stack");
    let copies = [
        local.join("web"),
        merklectl::up::node_root(&stack_dir, 1).join("web"),
        merklectl::up::node_root(&stack_dir, 2).join("web"),
    ];
    for (i, copy) in copies.iter().enumerate() {
        std::fs::create_dir_all(copy.join("css")).expect("mkdir");
        std::fs::write(copy.join("css/site.css"), "body {}").expect("write");
        let index = if i == 2 { "tampered" } else { "hello" };
        std::fs::write(copy.join("index.html"), index).expect("write");
    }
    let admin = stack_dir.join("auth/admin.token");
    let run = |args: &[&str]| integration_tests::run_merklectl_with_token(&admin, args);
    let (code, out, err) = run(&["source", "add", "web", "web", "--fleet", "--addr", &addr(0)]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("web"), "{out}");
    let (code, out, err) = run(&["build", "web", "--addr", &addr(0)]);
    assert_eq!(code, Some(0), "{out}{err}");
    // The terminal's answer first: node-2 differs, in index.html.
    let (code, out, err) = run(&["drift", "web", "--addr", &addr(2)]);
    assert_eq!(
        code,
        Some(1),
        "drift exits 1 when a node differs: {out}{err}"
    );
    assert!(
        out.contains("node-2") && out.contains("index.html"),
        "{out}"
    );

    let target = Target {
        uris: [addr(0), addr(2), addr(3), addr(4)],
        reader: stack_dir.join("auth/reader.token"),
        operator: stack_dir.join("auth/operator.token"),
        dir: data.path().to_path_buf(),
    };
    let (url, _console) = console(&target, Launch::ReaderEnv).await;
    let browser = Browser::start(data.path()).await;
    browser.go(&format!("{url}/")).await;
    assert!(browser.text("#fleet").await.contains("3 ready"));
    // From the fleet source's page to its drift, a click.
    browser.go(&format!("{url}/sources/web")).await;
    browser.click("a[href='/drift/web']").await;
    let summary = browser
        .text_until("#drift-summary", |s| !s.is_empty())
        .await;
    assert!(summary.starts_with("3 members, 1 differ"), "{summary}");
    let outlier = browser.text(".outlier").await;
    assert!(
        outlier.contains("node-2")
            && outlier.contains("index.html")
            && !outlier.contains("site.css"),
        "{outlier}"
    );
    let baseline = browser.text("body").await;
    assert!(
        baseline.contains("local") && baseline.contains("node-1"),
        "{baseline}"
    );
    browser.screenshot("drift").await;
    browser.call("DELETE", "", Value::Null).await;
}
