// A blocking one-shot HTTP/1.1 GET over loopback (Boost.Beast), for tests of the services' HTTP
// ports.
#pragma once

#include <string>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace cleave::testing {

struct HttpReply {
  int status = 0;
  std::string content_type;
  std::string body;
};

inline HttpReply HttpGet(int port, const std::string& target) {
  namespace http = boost::beast::http;
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::socket socket(ioc);
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)});
  http::request<http::empty_body> req{http::verb::get, target, 11};
  req.set(http::field::host, "localhost");
  req.keep_alive(false);
  http::write(socket, req);
  boost::beast::flat_buffer buffer;
  http::response<http::string_body> res;
  http::read(socket, buffer, res);
  return {static_cast<int>(res.result_int()), std::string(res[http::field::content_type]), res.body()};
}

}  // namespace cleave::testing
