"""A real single-node Cassandra for development and tests, fetched from Maven and run as a JVM.

`persona cassandra start|stop|status` calls into here. The jars come from Maven
Central through pom.xml (cached under .cache/cassandra, git-ignored); the node's
cassandra.yaml, logback.xml, data, logs and pid file live under
<data_dir>/cassandra/<native port>. Start waits until a CQL session connects; stop
signals exactly the recorded pid (after checking it still is that JVM).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from persona.errors import ConfigError, PersonaError, ToolMissing
from persona.settings import PROJECT_ROOT, Settings

POM = Path(__file__).with_name("pom.xml")
MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"

# From Cassandra 5.0's conf/jvm17-server.options: what the daemon needs opened on Java 17.
_JAVA17_FLAGS = [
    "-Djdk.attach.allowAttachSelf=true",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports=java.management/com.sun.jmx.remote.security=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
] + [
    f"--add-opens=java.base/{package}=ALL-UNNAMED"
    for package in (
        "java.lang.module",
        "jdk.internal.loader",
        "jdk.internal.ref",
        "jdk.internal.reflect",
        "jdk.internal.math",
        "jdk.internal.module",
        "jdk.internal.util.jar",
        "sun.nio.ch",
        "java.io",
        "java.nio",
        "java.lang.reflect",
        "java.lang",
        "java.util",
    )
]

# Only what one node on loopback needs: its name and token, addresses, ports and
# directories. Every limit a client can hit (batch size thresholds, request and
# CAS timeouts, commitlog segment and so mutation size) is left at Cassandra's
# default, so what passes here passes against a default production node.
CASSANDRA_YAML = """\
# Written by `persona cassandra start`: a single development node on loopback.
cluster_name: persona-local
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: {storage_port}
native_transport_port: {native_port}
start_native_transport: true
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:{storage_port}"
data_file_directories:
  - {home}/data
commitlog_directory: {home}/commitlog
saved_caches_directory: {home}/saved_caches
hints_directory: {home}/hints
cdc_raw_directory: {home}/cdc_raw
cdc_enabled: false
# Tests truncate and drop keyspaces all day; snapshots of them would only fill the disk.
auto_snapshot: false
{commitlog_sync}
"""

# What acknowledges a write (settings.durability). Cassandra's default, periodic,
# acknowledges once the mutation is in the commitlog and fsyncs it every 10 s; batch
# acknowledges only after the fsync (concurrent writes share one).
COMMITLOG_SYNC = {
    "normal": "commitlog_sync: periodic\ncommitlog_sync_period: 10000ms",
    "strict": "commitlog_sync: batch",
}

LOGBACK_XML = """\
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{home}/logs/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <filter class="ch.qos.logback.classic.filter.ThresholdFilter"><level>WARN</level></filter>
    <encoder><pattern>%-5level %date{{ISO8601}} %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/><appender-ref ref="STDOUT"/></root>
  <logger name="org.apache.cassandra" level="INFO"/>
</configuration>
"""


class CassandraNodeError(PersonaError):
    """The local node could not be fetched, started or stopped; the message says why."""


@dataclass(frozen=True)
class LocalNode:
    """One local node: where it lives and which ports it uses."""

    home: Path
    lib_dir: Path
    native_port: int
    storage_port: int
    heap: str
    # "normal" or "strict" (settings.durability): picks the commitlog sync mode.
    durability: str = "normal"

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalNode:
        return cls(
            home=Path(settings.data_dir) / "cassandra" / str(settings.cassandra_port),
            lib_dir=PROJECT_ROOT / ".cache" / "cassandra" / "lib",
            native_port=settings.cassandra_port,
            storage_port=settings.cassandra_storage_port,
            heap=settings.cassandra_heap,
            durability=settings.durability,
        )

    @property
    def pid_file(self) -> Path:
        return self.home / "cassandra.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "system.log"

    # --- tools ---
    @staticmethod
    def check_java() -> str:
        java = shutil.which("java")
        if not java:
            raise ToolMissing("Java 17 is needed to run Cassandra: install openjdk-17-jre-headless")
        out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
        match = re.search(r'version "(\d+)', out)
        major = int(match.group(1)) if match else 0
        if major not in (11, 17):
            raise ToolMissing(
                f"Cassandra 5.0 runs on Java 11 or 17, found Java {major or '?'} at {java}: "
                "install openjdk-17-jre-headless and put it first on PATH"
            )
        return java

    def fetch_jars(self) -> Path:
        """Resolve cassandra-all and its runtime dependencies into lib_dir (idempotent)."""
        marker = self.lib_dir / ".complete"
        if marker.exists() and marker.read_text() == POM.read_text():
            return self.lib_dir
        mvn = shutil.which("mvn")
        if not mvn:
            raise ToolMissing("Maven is needed to fetch the Cassandra jars: install maven")
        if self.lib_dir.exists():
            shutil.rmtree(self.lib_dir)
        self.lib_dir.mkdir(parents=True)
        result = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={self.lib_dir}",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise CassandraNodeError(
                "Maven could not resolve Cassandra's jars:\n"
                + (result.stdout + result.stderr)[-3000:]
            )
        marker.write_text(POM.read_text())
        return self.lib_dir

    # --- process ---
    def running_pid(self) -> int | None:
        """The recorded pid if that process is alive and still a CassandraDaemon."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if MAIN_CLASS.encode() in cmdline else None

    def port_open(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.native_port)) == 0

    def cql_ready(self) -> bool:
        if not self.port_open():
            return False
        from cassandra.cluster import Cluster

        cluster = Cluster(["127.0.0.1"], port=self.native_port, connect_timeout=5)
        try:
            session = cluster.connect()
            session.execute("SELECT release_version FROM system.local")
            return True
        except Exception:  # any failure just means "not ready yet"
            return False
        finally:
            cluster.shutdown()

    def release_version(self) -> str | None:
        from cassandra.cluster import Cluster

        cluster = Cluster(["127.0.0.1"], port=self.native_port, connect_timeout=5)
        try:
            return cluster.connect().execute("SELECT release_version FROM system.local").one()[0]
        except Exception:
            return None
        finally:
            cluster.shutdown()

    def config_yaml(self) -> str:
        """The cassandra.yaml this node starts with (written on every start)."""
        try:
            commitlog_sync = COMMITLOG_SYNC[self.durability]
        except KeyError:
            raise ConfigError(
                f"durability {self.durability!r} is not one of {sorted(COMMITLOG_SYNC)} "
                "(PERSONA_DURABILITY)"
            ) from None
        return CASSANDRA_YAML.format(
            home=self.home,
            native_port=self.native_port,
            storage_port=self.storage_port,
            commitlog_sync=commitlog_sync,
        )

    def _write_config(self) -> Path:
        for sub in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "logs", "conf"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        conf = self.home / "conf"
        (conf / "cassandra.yaml").write_text(self.config_yaml())
        (conf / "logback.xml").write_text(LOGBACK_XML.format(home=self.home))
        return conf

    def command(self, java: str) -> list[str]:
        conf = self._write_config()
        jamm = sorted(self.lib_dir.glob("jamm-*.jar"))
        return [
            java,
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-Xss256k",
            "-XX:+UseG1GC",
            "-Djava.net.preferIPv4Stack=true",
            *_JAVA17_FLAGS,
            *([f"-javaagent:{jamm[0]}"] if jamm else []),
            f"-Dcassandra.config=file://{conf / 'cassandra.yaml'}",
            f"-Dlogback.configurationFile={conf / 'logback.xml'}",
            f"-Dcassandra.logdir={self.home / 'logs'}",
            f"-Dcassandra.storagedir={self.home}",
            "-Dcassandra-foreground=yes",
            # Single-node development start-up: no gossip settling, short ring delay.
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=1000",
            "-Dcassandra.superuser_setup_delay_ms=0",
            "-Dcassandra.unsafesystem=true",
            "-cp",
            f"{conf}:{self.lib_dir}/*",
            MAIN_CLASS,
        ]

    def start(self, timeout_s: float = 180.0) -> str:
        """Start the node and wait for CQL; a running node is left alone."""
        pid = self.running_pid()
        if pid:
            return f"Cassandra is already running (pid {pid}, port {self.native_port})"
        if self.port_open():
            raise CassandraNodeError(
                f"port {self.native_port} is taken by another process; set PERSONA_CASSANDRA_PORT"
            )
        java = self.check_java()
        self.fetch_jars()
        cmd = self.command(java)
        console = open(self.home / "logs" / "console.log", "ab")  # noqa: SIM115 - child owns it
        process = subprocess.Popen(
            cmd,
            stdout=console,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.home,
            start_new_session=True,
        )
        console.close()
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise CassandraNodeError(
                    f"Cassandra exited with code {process.returncode} during start-up; "
                    f"last log lines:\n{self.log_tail()}"
                )
            if self.cql_ready():
                return f"Cassandra started (pid {process.pid}) on 127.0.0.1:{self.native_port}"
            time.sleep(1.0)
        self.stop()
        raise CassandraNodeError(
            f"Cassandra did not accept CQL within {timeout_s:.0f}s; last log lines:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 60.0) -> str:
        pid = self.running_pid()
        if not pid:
            self.pid_file.unlink(missing_ok=True)
            return "Cassandra is not running"
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.running_pid():
            time.sleep(0.5)
        if self.running_pid():
            os.kill(pid, signal.SIGKILL)
            while self.running_pid():
                time.sleep(0.2)
        self.pid_file.unlink(missing_ok=True)
        return f"Cassandra stopped (pid {pid})"

    def status(self) -> tuple[bool, str]:
        pid = self.running_pid()
        if not pid:
            return False, f"Cassandra is not running (port {self.native_port})"
        version = self.release_version()
        if version is None:
            return False, f"Cassandra pid {pid} is up but not answering CQL on {self.native_port}"
        return True, f"Cassandra {version} running (pid {pid}) on 127.0.0.1:{self.native_port}"

    def log_tail(self, lines: int = 30) -> str:
        for path in (self.log_file, self.home / "logs" / "console.log"):
            if path.exists():
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log written)"
