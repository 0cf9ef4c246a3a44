//! The accept loops at the process's open-file limit: a server that cannot accept more
//! connections must neither spin a core nor flood its log, must keep its own answers
//! going where it can, and must recover once connections close. Runs the real binary
//! under a low `ulimit -n`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fp32_request, Client, TestRepo};

/// Descriptors the server may open: enough to start and serve, far fewer than the
/// connections the test opens.
const NOFILE: u32 = 128;
const CONNECTIONS: usize = 300;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One HTTP/1 GET on a fresh connection: the status code, or `None` if the server did
/// not answer within a second.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) the process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the server runs");
    // Fields after the command name (which is in parentheses and may hold spaces):
    // state is field 3, utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let per_second: f64 = String::from_utf8(
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf runs")
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    ticks / per_second
}

struct Server {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_open_file_limit_accepting_backs_off_quietly_and_recovers() {
    let repo = TestRepo::new();
    repo.synthetic("id", "[ 2 ]", 0, &[]);
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    let log = tempfile::NamedTempFile::new().expect("log file");
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .args(["--model-repository", repo.path().to_str().unwrap()])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--http-port", &http.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .stdin(Stdio::null())
        .spawn()
        .expect("the sluice binary starts");
    let server = Server { child, log };
    let began = Instant::now();
    let pid = server.child.id();
    let http_addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let grpc_addr: SocketAddr = format!("127.0.0.1:{grpc}").parse().unwrap();
    let start = Instant::now();
    while http_status(http_addr, "/v2/health/ready") != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Far more connections than the server has descriptors: the kernel completes their
    // handshakes into the listen backlog, and the server's accept fails with EMFILE.
    let held: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| TcpStream::connect(grpc_addr).expect("the kernel accepts into the backlog"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_seconds(pid);
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    let elapsed = window.elapsed().as_secs_f64();
    assert!(
        used < 0.25 * elapsed,
        "the server used {used:.2} s of CPU in {elapsed:.2} s at its descriptor limit: it spins"
    );

    // Once the connections close, it accepts again and serves.
    drop(held);
    let start = Instant::now();
    while http_status(http_addr, "/v2/health/live") != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "health did not answer again after the connections closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut client = Client::connect(format!("http://{grpc_addr}"))
        .await
        .expect("a gRPC client connects again");
    client
        .model_infer(fp32_request("id", "INPUT__0", &[2], &[1.0, 2.0]))
        .await
        .expect("a good request is served");

    let mut text = String::new();
    std::fs::File::open(server.log.path())
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let lines = text
        .lines()
        .filter(|l| l.contains("cannot accept a connection"))
        .count();
    assert!(lines >= 1, "the accept errors were logged:\n{text}");
    // One line per 10 s at most on each of the three ports, with the count held back.
    let allowed = 3 * (began.elapsed().as_secs() / 10 + 1);
    assert!(
        lines as u64 <= allowed,
        "{lines} accept-error lines in {:?} (at most {allowed}): the log is flooded",
        began.elapsed()
    );
    let held_back = text.contains("held_back=");
    assert!(held_back, "the lines say how many were held back:\n{text}");
}
