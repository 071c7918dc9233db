// Internals of the HTTP server shared by its .cc files: the per-connection Session, the
// per-request GenerateCall, the routes that answer at once, and the server-wide state.
//
// Threading: every Session (and the GenerateCall it runs) lives on its own strand of the
// server's io_context, so none of their members need locks. Engine threads reach a call only by
// posting to that strand.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/status/status.h"
#include "cleave/frontend/frontend_context.h"
#include "cleave/frontend/http_server.h"

namespace cleave::frontend::http_internal {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using Executor = net::any_io_executor;  // a strand of the io_context

// A complete (non-streamed) response.
struct SimpleResponse {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
  bool close = false;  // close the connection after it (413, 431...)
};

SimpleResponse JsonResponse(int status, std::string body);
// OpenAI error body with the status HttpStatusFor picks; 429 gets Retry-After.
SimpleResponse ErrorResponse(const absl::Status& status, int retry_after_s = 0);
SimpleResponse ErrorResponse(int http_status, std::string_view message, std::string_view param = "");

// /health, /ready, /v1/models, /tokenize, /detokenize, /debug/kv, and the 404/405 answers for
// anything that is not a generation route. Thread-safe.
SimpleResponse HandleSimpleRoute(const FrontendContext& ctx, http::verb method,
                                 std::string_view path, const std::string& body);
// With API keys configured, the 401 for a request to `path` (anything but /health) whose
// Authorization header (`authorization`, "" when absent) names no key; nullopt when it may pass.
std::optional<SimpleResponse> CheckApiKey(const FrontendContext& ctx, std::string_view path,
                                          std::string_view authorization);

struct ServerState;
class GenerateCall;

class Session : public std::enable_shared_from_this<Session> {
 public:
  // `socket` must use a strand of server.ioc as its executor (the acceptor accepts onto one).
  Session(tcp::socket socket, ServerState& server);
  ~Session();

  void Start();
  // From HttpServer::Stop (any thread): close the connection, cancelling its request.
  void Shutdown();

  // For the GenerateCall running on this session (strand only, except executor()).
  const Executor& executor() const { return executor_; }
  bool http10() const { return http10_; }
  void Write(std::string bytes);
  void SendResponse(const SimpleResponse& response);
  // Counts this request's response status under its endpoint (once per request).
  void CountStatus(int status);
  // All bytes of the response are queued: once written, read the next request (or close).
  void EndResponse(bool close);

 private:
  void ReadHeader();
  void OnHeader(beast::error_code ec);
  void ReadBody();
  void OnBody(beast::error_code ec);
  void Dispatch();
  // While a request is being generated, a read on the socket notices the client leaving.
  void Watch();
  void OnWatch(beast::error_code ec, size_t n);
  void DoWrite();
  void OnWrite(beast::error_code ec);
  void Next();
  void LingeringClose();
  void Drain(size_t drained);
  void Close();

  ServerState& server_;
  beast::tcp_stream stream_;
  Executor executor_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::deque<std::string> out_;
  std::string path_;  // the current request's path (a metrics label only through LabelValue)
  bool writing_ = false;
  bool watching_ = false;
  bool in_request_ = false;     // a request is being answered
  bool response_done_ = false;  // its last bytes are queued
  bool keep_alive_ = true;
  bool close_after_ = false;
  bool http10_ = false;
  bool closed_ = false;
  bool server_stopping_ = false;  // closed by HttpServer::Stop, not by the client
  // When the current request's header was parsed: the start of its timeline (request_log.h).
  std::chrono::steady_clock::time_point request_start_{};
  std::shared_ptr<GenerateCall> call_;
};

// Builds and runs one /v1/completions or /v1/chat/completions request on a session. Returns the
// call (already started), or nullptr after having sent an error response itself (including 503
// while the frontend drains). `client_request_id` is the x-request-id header ("" when absent);
// `received` is when the request's header was parsed.
std::shared_ptr<GenerateCall> StartGenerateCall(const std::shared_ptr<Session>& session,
                                                const FrontendContext& ctx, bool chat,
                                                const std::string& body,
                                                std::string_view client_request_id,
                                                std::chrono::steady_clock::time_point received);
// The client went away (by_server false) or the server stops (true): cancel every choice.
// Idempotent; strand only.
void CancelGenerateCall(GenerateCall& call, bool by_server);

struct ServerState {
  HttpServerOptions options;
  const FrontendContext& ctx;
  std::atomic<int> connections{0};

  std::mutex mu;  // guards sessions and stopping
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions;
  bool stopping = false;

  // Last, so it is destroyed first: handlers it still holds may own Sessions, whose destructors
  // use the members above.
  net::io_context ioc;

  ServerState(const HttpServerOptions& o, const FrontendContext& c)
      : options(o), ctx(c), ioc(o.threads) {}
};

}  // namespace cleave::frontend::http_internal
