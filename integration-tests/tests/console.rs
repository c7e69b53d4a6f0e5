//! The web console in a real browser: Debian's chromium, driven over WebDriver (chromedriver,
//! the W3C protocol spoken here with plain HTTP), against the real services and the real
//! `merklectl console`. The overview lists the sources; a triggered build's progress updates
//! on the source page without a reload; the diff page lists the changed path; the drift page
//! shows the outlier node of a three-node fleet; the log page shows the checkpoint; a console
//! without an operator's token offers no Trigger and refuses one.
//!
//! With `CONSOLE_SCREENSHOTS=DIR` the pages' screenshots are written there (the README's).

use std::{
    path::Path,
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
        let _ = rustls::crypto::ring::default_provider().install_default();
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

/// Starts `merklectl console` on a free port; returns its URL and the process once the
/// chart's probe passes.
async fn console(stack: &mut TestStack, launch: Launch) -> (String, ManagedProcess) {
    let port = free_port().expect("port");
    let mut command = Command::new(binary("merklectl"));
    command.arg("console").env_remove("MERKLE_TOKEN_FILE");
    let services = [
        ("scheduler", "SCHEDULER_ADDR"),
        ("db-sync", "DB_SYNC_ADDR"),
        ("cache", "CACHE_ADDR"),
        ("discovery", "DISCOVERY_ADDR"),
    ];
    if launch == Launch::OperatorFlags {
        command.args(["--listen", &format!("127.0.0.1:{port}")]);
        for (service, _) in services {
            command.args([
                format!("--{service}-addr"),
                stack.service_mut(service).uri(),
            ]);
        }
        command
            .arg("--reader-token-file")
            .arg(credentials().token_file("reader"))
            .arg("--operator-token-file")
            .arg(credentials().token_file("operator"));
    } else {
        command.env("CONSOLE_LISTEN_ADDR", format!("127.0.0.1:{port}"));
        for (service, variable) in services {
            command.env(variable, stack.service_mut(service).uri());
        }
        if launch == Launch::ReaderEnv {
            command.env(
                "CONSOLE_READER_TOKEN_FILE",
                credentials().token_file("reader"),
            );
        } else {
            command.env("CONSOLE_NO_TOKEN", "true");
        }
    }
    let log = stack.dir().join(format!("console-{port}.log"));
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
async fn the_console_shows_sources_live_builds_diffs_drift_and_the_log_in_a_real_browser() {
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
    let db_sync = stack.service_mut("db-sync").uri();
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
    // A fleet of three nodes as the Scheduler stores it (`web@<node>`), node-3 different.
    let web = stack.dir().join("web");
    std::fs::create_dir_all(&web).expect("mkdir");
    std::fs::write(web.join("index.html"), "hello").expect("write");
    let web_arg = web.to_str().expect("utf-8");
    for node in ["node-1", "node-2"] {
        let (code, _, err) =
            run_merklectl(&["push", &format!("web@{node}"), web_arg, "--addr", &db_sync]);
        assert_eq!(code, Some(0), "{err}");
    }
    std::fs::write(web.join("index.html"), "tampered").expect("write");
    let (code, _, err) = run_merklectl(&["push", "web@node-3", web_arg, "--addr", &db_sync]);
    assert_eq!(code, Some(0), "{err}");

    let (url, _console) = console(&mut stack, Launch::OperatorFlags).await;
    let browser = Browser::start(stack.dir()).await;

    // The overview.
    browser.go(&format!("{url}/")).await;
    let sources = browser.text("#sources").await;
    assert!(
        sources.contains("docs") && sources.contains("SUCCEEDED_CHANGED"),
        "{sources}"
    );
    assert!(browser.text("#fleet").await.contains("1 ready"));
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

    // Fleet drift: node-3 is the outlier, index.html the path.
    browser.go(&format!("{url}/drift/web")).await;
    assert!(
        browser
            .text("#drift-summary")
            .await
            .starts_with("3 members, 1 differ")
    );
    let outlier = browser.text(".outlier").await;
    assert!(
        outlier.contains("node-3") && outlier.contains("index.html"),
        "{outlier}"
    );
    browser.screenshot("drift").await;

    // The log: every record so far (two docs snapshots, three web nodes) once checkpointed
    // (within LOG_INTERVAL of the last commit; the page shows the checkpoint it was served).
    let size = browser
        .text_until_reloaded(&format!("{url}/log"), "#log-size", |s| {
            s.contains("holds 5 records")
        })
        .await;
    assert!(size.contains("5"), "{size}");
    assert!(
        browser
            .text("#checkpoint")
            .await
            .starts_with("merkle-mesh.local/log\n5\n")
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
    let (reader_url, _reader) = console(&mut stack, Launch::ReaderEnv).await;
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
    let (anonymous, _anonymous) = console(&mut stack, Launch::NoTokenEnv).await;
    let (status, page) = http("GET", &anonymous, &[], "").await;
    assert!(
        status == 403 && page.contains("Unauthenticated"),
        "{status} {page}"
    );
}
