// HttpServer: the acceptor and the io_context thread pool. Connections are Sessions
// (http_session.cc); each runs on its own strand, so a few threads serve thousands of them.
#include "cleave/frontend/http_server.h"

#include <sys/resource.h>

#include <thread>

#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "http_internal.h"

namespace cleave::frontend {

using namespace http_internal;  // NOLINT: this file is the server's own implementation

struct HttpServer::Impl {
  explicit Impl(const HttpServerOptions& options, const FrontendContext& ctx)
      : state(options, ctx), acceptor(net::make_strand(state.ioc)), retry_timer(acceptor.get_executor()) {}

  void Accept();
  void OnAccept(beast::error_code ec, tcp::socket socket);

  ServerState state;
  tcp::acceptor acceptor;
  net::steady_timer retry_timer;  // backs off when accept fails (e.g. out of descriptors)
  std::vector<std::thread> threads;
  std::mutex stop_mu;
  bool stopped = false;
  int port = 0;
};

namespace {

// Each streaming client costs a descriptor; the usual soft limit of 1024 would cap the server
// well below its design load, so raise it to the hard limit, as most servers do.
void RaiseDescriptorLimit() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rlim_t old = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) == 0) {
      CLEAVE_LOG(Info) << "raised the open-file limit from " << old << " to " << rl.rlim_cur;
    }
  }
}

}  // namespace

void HttpServer::Impl::Accept() {
  acceptor.async_accept(net::make_strand(state.ioc),
                        [this](beast::error_code ec, tcp::socket socket) {
                          OnAccept(ec, std::move(socket));
                        });
}

void HttpServer::Impl::OnAccept(beast::error_code ec, tcp::socket socket) {
  if (ec == net::error::operation_aborted || !acceptor.is_open()) return;  // Stop()
  if (ec) {
    CLEAVE_LOG(Warning) << "accept failed: " << ec.message() << "; retrying in 50 ms";
    retry_timer.expires_after(std::chrono::milliseconds(50));
    retry_timer.async_wait([this](beast::error_code wait_ec) {
      if (!wait_ec && acceptor.is_open()) Accept();
    });
    return;
  }
  if (state.connections.load() >= state.options.max_connections) {
    beast::error_code ignored;
    socket.close(ignored);
  } else {
    beast::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);  // SSE chunks are small and latency-bound
    auto session = std::make_shared<Session>(std::move(socket), state);
    {
      // Checked under the lock Stop() takes, so no connection slips past its shutdown sweep.
      std::lock_guard<std::mutex> lock(state.mu);
      if (state.stopping) return;
      state.sessions[session.get()] = session;
    }
    session->Start();
  }
  Accept();
}

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { Stop(); }

int HttpServer::port() const { return impl_->port; }

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const HttpServerOptions& options,
                                                              FrontendContext& ctx) {
  if (options.threads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("threads must be at least 1, got ", options.threads));
  }
  if (ctx.tokenizer == nullptr || ctx.chat_template == nullptr || ctx.engine == nullptr) {
    return absl::InvalidArgumentError("FrontendContext needs a tokenizer, a chat template and an engine");
  }
  RaiseDescriptorLimit();
  auto impl = std::make_unique<Impl>(options, ctx);
  beast::error_code ec;
  net::ip::address address = net::ip::make_address(options.host, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("bad host '", options.host, "': ", ec.message()));
  tcp::endpoint endpoint(address, static_cast<unsigned short>(options.port));
  auto fail = [&](const char* what) {
    return absl::UnavailableError(absl::StrCat("HTTP server: ", what, " ", endpoint.address().to_string(),
                                               ":", options.port, ": ", ec.message()));
  };
  impl->acceptor.open(endpoint.protocol(), ec);
  if (ec) return fail("open");
  impl->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  impl->acceptor.bind(endpoint, ec);
  if (ec) return fail("bind");
  impl->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) return fail("listen");
  impl->port = impl->acceptor.local_endpoint().port();

  impl->Accept();
  for (int i = 0; i < options.threads; ++i) {
    impl->threads.emplace_back([state = &impl->state] { state->ioc.run(); });
  }
  CLEAVE_LOG(Info) << "HTTP server listening on " << options.host << ":" << impl->port << " ("
                   << options.threads << " threads)";
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

void HttpServer::Stop() {
  std::lock_guard<std::mutex> stop_lock(impl_->stop_mu);
  if (impl_->stopped) return;
  impl_->stopped = true;
  Impl* impl = impl_.get();
  net::post(impl->acceptor.get_executor(), [impl] {
    beast::error_code ignored;
    impl->acceptor.close(ignored);
    impl->retry_timer.cancel();
  });
  // Closing every connection cancels its requests; GenerationStream::Cancel guarantees no more
  // engine callbacks post here afterwards, so the io_context runs dry and the threads exit.
  std::vector<std::shared_ptr<Session>> sessions;
  {
    std::lock_guard<std::mutex> lock(impl->state.mu);
    impl->state.stopping = true;
    for (auto& [ptr, weak] : impl->state.sessions) {
      if (auto s = weak.lock()) sessions.push_back(std::move(s));
    }
  }
  for (auto& s : sessions) s->Shutdown();
  sessions.clear();
  for (std::thread& t : impl->threads) t.join();
  impl->threads.clear();
}

}  // namespace cleave::frontend
