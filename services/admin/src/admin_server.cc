// AdminServer: one io_context thread, one async Session per connection. Everything (acceptor,
// sessions, the session table) lives on that thread, so nothing here needs a lock except Stop()'s
// own flag. A client that connects and sends nothing costs one idle socket until its read timeout;
// it never holds the thread.
//
// Session states:  Read -> Respond -> Read (keep-alive) | Close;  any error or timeout -> Close
#include "cleave/admin/admin_server.h"

#include <chrono>
#include <cstdio>
#include <mutex>
#include <sstream>
#include <string_view>
#include <thread>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "cleave/common/metrics.h"

namespace cleave::admin {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

// A scrape is one small request; anyone slower than this is gone or hostile.
constexpr std::chrono::seconds kReadTimeout{10};
constexpr std::chrono::seconds kWriteTimeout{10};
// The admin port only takes GETs: refuse big requests rather than buffer them.
constexpr uint32_t kHeaderLimit = 16 * 1024;
constexpr uint64_t kBodyLimit = 64 * 1024;

std::string JsonString(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

AdminResponse JsonError(int status, std::string_view message) {
  return {status, "application/json",
          "{\"error\":{\"message\":" + JsonString(message) + "}}"};
}

std::string_view PathOf(std::string_view target) {
  size_t q = target.find('?');
  return q == std::string_view::npos ? target : target.substr(0, q);
}

}  // namespace

class Session;

struct AdminServer::Impl {
  Impl(std::string host, std::map<std::string, AdminHandler> routes)
      : host(std::move(host)), routes(std::move(routes)), acceptor(ioc), retry_timer(ioc) {}

  void Accept();
  AdminResponse Handle(http::verb method, std::string_view path) const;

  // Declared first so it is destroyed last: sockets and timers deregister from it.
  net::io_context ioc;
  const std::string host;
  const std::map<std::string, AdminHandler> routes;
  tcp::acceptor acceptor;
  net::steady_timer retry_timer;  // backs off when accept fails (e.g. out of descriptors)
  // Live sessions, so Stop() can close them; touched only on the io thread.
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions;
  std::thread thread;
  int port = 0;
  std::mutex stop_mu;
  bool stopped = false;  // guarded by stop_mu
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, AdminServer::Impl& server)
      : server_(server), stream_(std::move(socket)) {}

  void Read() {
    if (closed_) return;
    parser_.emplace();
    parser_->header_limit(kHeaderLimit);
    parser_->body_limit(kBodyLimit);
    stream_.expires_after(kReadTimeout);
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       self->OnRead(ec);
                     });
  }

  void Close() {
    if (closed_) return;
    closed_ = true;
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
    server_.sessions.erase(this);
  }

 private:
  void OnRead(beast::error_code ec) {
    // EOF between requests, a timeout, a reset or a malformed/oversized request: nothing useful
    // can be answered on an admin port, so just close.
    if (ec) return Close();
    const auto& req = parser_->get();
    const http::verb method = req.method();
    const std::string_view target(req.target().data(), req.target().size());
    AdminResponse r = server_.Handle(method, PathOf(target));
    keep_alive_ = req.keep_alive();
    const unsigned version = req.version();
    std::ostringstream os;
    if (method == http::verb::head) {
      // Same headers as GET, Content-Length included, and no body.
      http::response<http::empty_body> res{static_cast<http::status>(r.status), version};
      SetHeaders(res, r);
      res.content_length(r.body.size());
      os << res;
    } else {
      http::response<http::string_body> res{static_cast<http::status>(r.status), version};
      SetHeaders(res, r);
      res.body() = std::move(r.body);
      res.prepare_payload();
      os << res;
    }
    out_ = std::move(os).str();
    stream_.expires_after(kWriteTimeout);
    net::async_write(stream_, net::buffer(out_),
                     [self = shared_from_this()](beast::error_code write_ec, size_t) {
                       self->OnWrite(write_ec);
                     });
  }

  template <typename Response>
  void SetHeaders(Response& res, const AdminResponse& r) const {
    res.set(http::field::server, "cleave");
    res.set(http::field::content_type, r.content_type);
    if (r.status == 405) res.set(http::field::allow, "GET, HEAD");
    res.keep_alive(keep_alive_);
  }

  void OnWrite(beast::error_code ec) {
    out_.clear();
    if (ec || !keep_alive_) return Close();
    Read();
  }

  AdminServer::Impl& server_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::string out_;
  bool keep_alive_ = false;
  bool closed_ = false;
};

void AdminServer::Impl::Accept() {
  acceptor.async_accept(ioc, [this](beast::error_code ec, tcp::socket socket) {
    if (!acceptor.is_open()) return;  // Stop()
    if (ec) {
      CLEAVE_LOG(Warning) << "admin server: accept failed: " << ec.message()
                          << "; retrying in 50 ms";
      retry_timer.expires_after(std::chrono::milliseconds(50));
      retry_timer.async_wait([this](beast::error_code wait_ec) {
        if (!wait_ec && acceptor.is_open()) Accept();
      });
      return;
    }
    auto session = std::make_shared<Session>(std::move(socket), *this);
    sessions[session.get()] = session;
    session->Read();
    Accept();
  });
}

AdminResponse AdminServer::Impl::Handle(http::verb method, std::string_view path) const {
  auto it = routes.find(std::string(path));
  if (it == routes.end()) return JsonError(404, absl::StrCat("no route for ", std::string(path)));
  if (method != http::verb::get && method != http::verb::head) {
    return JsonError(405, absl::StrCat(std::string(path), " accepts GET and HEAD only"));
  }
  return it->second();
}

AdminServer::AdminServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

AdminServer::~AdminServer() { Stop(); }

int AdminServer::port() const { return impl_->port; }

std::string AdminServer::address() const { return absl::StrCat(impl_->host, ":", impl_->port); }

absl::StatusOr<std::unique_ptr<AdminServer>> AdminServer::Start(
    const AdminServerOptions& options, std::map<std::string, AdminHandler> routes) {
  if (options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("admin server: bad port ", options.port));
  }
  auto impl = std::make_unique<Impl>(options.host, std::move(routes));
  beast::error_code ec;
  net::ip::address address = net::ip::make_address(options.host, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("admin server: bad host '", options.host, "': ", ec.message()));
  }
  tcp::endpoint endpoint(address, static_cast<unsigned short>(options.port));
  auto fail = [&](const char* what) {
    return absl::UnavailableError(absl::StrCat("admin server: ", what, " ", options.host, ":",
                                               options.port, ": ", ec.message()));
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
  impl->thread = std::thread([ioc = &impl->ioc] { ioc->run(); });
  CLEAVE_LOG(Info) << "admin HTTP server listening on " << options.host << ":" << impl->port;
  return std::unique_ptr<AdminServer>(new AdminServer(std::move(impl)));
}

absl::StatusOr<std::optional<AdminServerOptions>> ParseAdminAddress(const std::string& address,
                                                                    const std::string& what) {
  if (address == "off") return std::nullopt;
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be HOST:PORT or off, got '", address, "'"));
  }
  AdminServerOptions options;
  options.host = address.substr(0, colon);
  if (options.host.size() > 2 && options.host.front() == '[' && options.host.back() == ']') {
    options.host = options.host.substr(1, options.host.size() - 2);
  }
  options.port = port;
  return options;
}

void AdminServer::Stop() {
  std::lock_guard<std::mutex> lock(impl_->stop_mu);
  if (impl_->stopped) return;
  impl_->stopped = true;
  // Closing the acceptor and every socket completes their pending operations with
  // operation_aborted; the handlers then return without new work, run() runs dry and returns.
  Impl* impl = impl_.get();
  net::post(impl->ioc, [impl] {
    beast::error_code ignored;
    impl->acceptor.close(ignored);
    impl->retry_timer.cancel();
    std::vector<std::shared_ptr<Session>> live;
    for (auto& [ptr, weak] : impl->sessions) {
      if (auto s = weak.lock()) live.push_back(std::move(s));
    }
    for (auto& s : live) s->Close();
  });
  if (impl->thread.joinable()) impl->thread.join();
}

std::map<std::string, AdminHandler> StandardRoutes(const metrics::Registry& registry,
                                                   std::function<std::string()> not_ready_reason) {
  std::map<std::string, AdminHandler> routes;
  routes["/metrics"] = [&registry] {
    return AdminResponse{200, std::string(metrics::kContentType), registry.Render()};
  };
  routes["/health"] = [] { return AdminResponse{200, "application/json", "{\"status\":\"alive\"}"}; };
  routes["/ready"] = [fn = std::move(not_ready_reason)] {
    std::string reason = fn ? fn() : std::string();
    if (reason.empty()) return AdminResponse{200, "application/json", "{\"ready\":true}"};
    return AdminResponse{503, "application/json",
                         absl::StrCat("{\"ready\":false,\"reason\":", JsonString(reason), "}")};
  };
  return routes;
}

}  // namespace cleave::admin
