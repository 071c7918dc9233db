// One HTTP/1.1 connection: read a request (header first, so that an oversized body is refused
// before it is read), answer it, repeat while keep-alive. Writes go through a queue so a stream
// can produce chunks faster than the socket takes them.
//
// States:  ReadHeader -> (ReadBody) -> Dispatch -> [generation: Watch + writes] -> Next
//          Next -> ReadHeader (keep-alive) | Close;  any socket error -> Close
#include <sstream>

#include "cleave/common/logging.h"
#include "http_internal.h"

#include "cleave/frontend/frontend_metrics.h"

namespace cleave::frontend::http_internal {
namespace {

constexpr std::chrono::seconds kWriteTimeout{60};
constexpr std::chrono::seconds kBodyTimeout{60};
constexpr size_t kWatchReadBytes = 4096;
constexpr std::chrono::seconds kLingerTimeout{2};
constexpr size_t kMaxLingerBytes = 1 << 20;

std::string_view PathOf(std::string_view target) {
  size_t q = target.find('?');
  return q == std::string_view::npos ? target : target.substr(0, q);
}

}  // namespace

Session::Session(tcp::socket socket, ServerState& server)
    : server_(server), stream_(std::move(socket)), executor_(stream_.get_executor()) {
  server_.connections.fetch_add(1);
}

Session::~Session() { server_.connections.fetch_sub(1); }

void Session::Start() {
  net::dispatch(executor_, [self = shared_from_this()] { self->ReadHeader(); });
}

void Session::Shutdown() {
  net::post(executor_, [self = shared_from_this()] {
    self->server_stopping_ = true;
    self->Close();
  });
}

void Session::ReadHeader() {
  if (closed_) return;
  in_request_ = false;
  response_done_ = false;
  path_.clear();
  parser_.emplace();
  parser_->header_limit(static_cast<uint32_t>(server_.options.max_header_bytes));
  parser_->body_limit(server_.options.max_body_bytes);
  stream_.expires_after(std::chrono::seconds(server_.options.idle_timeout_s));
  http::async_read_header(stream_, buffer_, *parser_,
                          [self = shared_from_this()](beast::error_code ec, size_t) {
                            self->OnHeader(ec);
                          });
}

void Session::OnHeader(beast::error_code ec) {
  if (ec == http::error::body_limit) return OnBody(ec);  // chunks read along with the header
  if (ec == http::error::header_limit) {
    in_request_ = true;
    keep_alive_ = false;
    SimpleResponse r = ErrorResponse(431, "Request header fields too large");
    r.close = true;
    return SendResponse(r);
  }
  if (ec && ec.category() == beast::error_code(http::error::bad_method).category() &&
      ec != http::error::end_of_stream && ec != http::error::partial_message) {
    in_request_ = true;
    keep_alive_ = false;
    SimpleResponse r = ErrorResponse(400, "Malformed HTTP request: " + ec.message());
    r.close = true;
    return SendResponse(r);
  }
  if (ec) return Close();  // EOF between requests, timeout, reset
  in_request_ = true;
  request_start_ = std::chrono::steady_clock::now();
  const auto& req = parser_->get();
  path_ = std::string(PathOf(std::string_view(req.target().data(), req.target().size())));
  http10_ = req.version() < 11;
  keep_alive_ = req.keep_alive();
  // Refuse an oversized body by its declared length, before reading any of it.
  if (auto len = parser_->content_length(); len && *len > server_.options.max_body_bytes) {
    SimpleResponse r = ErrorResponse(
        413, "Request body too large: " + std::to_string(*len) + " bytes, the limit is " +
                 std::to_string(server_.options.max_body_bytes));
    r.close = true;
    return SendResponse(r);
  }
  if (beast::iequals(req[http::field::expect], "100-continue")) {
    Write("HTTP/1.1 100 Continue\r\n\r\n");
  }
  ReadBody();
}

void Session::ReadBody() {
  stream_.expires_after(kBodyTimeout);
  http::async_read(stream_, buffer_, *parser_,
                   [self = shared_from_this()](beast::error_code ec, size_t) {
                     self->OnBody(ec);
                   });
}

void Session::OnBody(beast::error_code ec) {
  if (ec == http::error::body_limit) {  // chunked (or lying) body past the limit
    in_request_ = true;
    keep_alive_ = false;
    SimpleResponse r = ErrorResponse(
        413, "Request body too large: the limit is " +
                 std::to_string(server_.options.max_body_bytes) + " bytes");
    r.close = true;
    return SendResponse(r);
  }
  if (ec) return Close();
  stream_.expires_never();
  Dispatch();
}

void Session::Dispatch() {
  http::request<http::string_body> req = parser_->release();
  parser_.reset();
  const std::string_view path = PathOf(std::string_view(req.target().data(), req.target().size()));
  const bool chat = path == "/v1/chat/completions";
  std::string_view authorization;
  if (auto it = req.find(http::field::authorization); it != req.end()) {
    authorization = std::string_view(it->value().data(), it->value().size());
  }
  if (std::optional<SimpleResponse> refused = CheckApiKey(server_.ctx, path, authorization)) {
    return SendResponse(*refused);
  }
  if ((chat || path == "/v1/completions") && req.method() == http::verb::post) {
    std::string_view request_id;
    if (auto it = req.find("x-request-id"); it != req.end()) {
      request_id = std::string_view(it->value().data(), it->value().size());
    }
    call_ = StartGenerateCall(shared_from_this(), server_.ctx, chat, req.body(), request_id, request_start_);
    if (call_ != nullptr && !response_done_) Watch();
    return;
  }
  SendResponse(HandleSimpleRoute(server_.ctx, req.method(), path, req.body()));
}

void Session::Watch() {
  if (watching_ || closed_) return;
  // Bytes a pipelining client sends early are kept for the next request; past a bound, stop
  // watching (a write failure still notices a client that left).
  if (buffer_.size() > server_.options.max_header_bytes + server_.options.max_body_bytes) return;
  watching_ = true;
  stream_.expires_never();
  stream_.async_read_some(buffer_.prepare(kWatchReadBytes),
                          [self = shared_from_this()](beast::error_code ec, size_t n) {
                            self->OnWatch(ec, n);
                          });
}

void Session::OnWatch(beast::error_code ec, size_t n) {
  watching_ = false;
  if (!ec) {
    buffer_.commit(n);
    if (in_request_ && !response_done_) return Watch();
    if (in_request_) return;  // the response is still being written; Next() reads on
    return ReadHeader();
  }
  if (ec == net::error::operation_aborted && !closed_ && !in_request_) {
    return ReadHeader();  // cancelled by Next() so that the next request can be read
  }
  if (ec == net::error::operation_aborted && !closed_) return;
  // EOF or reset: the client went away mid-request. Cancel its generation at once.
  Close();
}

void Session::Write(std::string bytes) {
  if (closed_) return;
  out_.push_back(std::move(bytes));
  if (!writing_) DoWrite();
}

void Session::DoWrite() {
  writing_ = true;
  stream_.expires_after(kWriteTimeout);
  net::async_write(stream_, net::buffer(out_.front()),
                   [self = shared_from_this()](beast::error_code ec, size_t) {
                     self->OnWrite(ec);
                   });
}

void Session::OnWrite(beast::error_code ec) {
  if (ec) return Close();  // includes a client that stopped reading for kWriteTimeout
  out_.pop_front();
  if (!out_.empty()) return DoWrite();
  writing_ = false;
  if (response_done_) Next();
}

void Session::CountStatus(int status) {
  if (server_.ctx.metrics != nullptr) server_.ctx.metrics->CountHttp(path_, status);
}

void Session::SendResponse(const SimpleResponse& r) {
  CountStatus(r.status);
  http::response<http::string_body> res{static_cast<http::status>(r.status), http10_ ? 10 : 11};
  res.set(http::field::server, "cleave");
  res.set(http::field::content_type, r.content_type);
  for (const auto& [name, value] : r.headers) res.set(name, value);
  res.keep_alive(keep_alive_ && !r.close);
  res.body() = r.body;
  res.prepare_payload();
  std::ostringstream os;
  os << res;
  Write(os.str());
  EndResponse(r.close);
}

void Session::EndResponse(bool close) {
  response_done_ = true;
  close_after_ = close || !keep_alive_;
  if (!writing_) Next();
}

void Session::Next() {
  if (closed_) return;
  if (call_ != nullptr) {
    CancelGenerateCall(*call_, false);  // a no-op once it finished; breaks the call <-> session cycle
    call_.reset();
  }
  if (close_after_) return LingeringClose();
  in_request_ = false;
  if (watching_) {
    // The watch read owns the socket's read side; cancel it and read on from its handler.
    beast::error_code ec;
    stream_.socket().cancel(ec);
    return;
  }
  ReadHeader();
}

// Closing a socket with unread input makes the kernel send RST, which can destroy the response
// (e.g. a 413) before the client reads it. So: half-close, then discard what the client still
// sends for a short while, and only then close.
void Session::LingeringClose() {
  beast::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  if (ec || watching_) return Close();
  Drain(0);
}

void Session::Drain(size_t drained) {
  if (closed_ || drained > kMaxLingerBytes) return Close();
  stream_.expires_after(kLingerTimeout);
  buffer_.consume(buffer_.size());
  stream_.async_read_some(buffer_.prepare(kWatchReadBytes),
                          [self = shared_from_this(), drained](beast::error_code ec, size_t n) {
                            if (ec) return self->Close();
                            self->Drain(drained + n);
                          });
}

void Session::Close() {
  if (closed_) return;
  closed_ = true;
  if (call_ != nullptr) {
    CancelGenerateCall(*call_, server_stopping_);
    call_.reset();
  }
  beast::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
  stream_.close();
  std::lock_guard<std::mutex> lock(server_.mu);
  server_.sessions.erase(this);
}

}  // namespace cleave::frontend::http_internal
