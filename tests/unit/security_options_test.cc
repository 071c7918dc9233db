// The security options' parsing: TLS file sets (all or none, readable PEM), the KV cluster
// secret (>= 32 bytes), and client API keys (file + CLEAVE_API_KEYS list, Bearer matching).
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "cleave/common/tls.h"
#include "cleave/frontend/api_keys.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace cleave {
namespace {

using ::testing::HasSubstr;

class SecurityOptionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("cleave_security_test_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Write(const std::string& name, const std::string& bytes) {
    const std::filesystem::path p = dir_ / name;
    std::ofstream(p, std::ios::binary) << bytes;
    return p.string();
  }
  std::filesystem::path dir_;
};

TEST_F(SecurityOptionsTest, TlsFilesAllOrNone) {
  EXPECT_TRUE(tls::ValidateTlsFiles({}).ok());
  EXPECT_TRUE(tls::ValidateTlsFiles({"ca", "cert", "key"}).ok());
  absl::Status s = tls::ValidateTlsFiles({"ca", "", ""});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("cert_file"));
  EXPECT_THAT(s.message(), HasSubstr("key_file"));
  EXPECT_THAT(std::string(s.message()), ::testing::Not(HasSubstr("ca_file")));
}

TEST_F(SecurityOptionsTest, LoadTlsPemReadsOrNamesTheBadFile) {
  const std::string pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
  const std::string ca = Write("ca.crt", pem), cert = Write("a.crt", pem), key = Write("a.key", pem);
  absl::StatusOr<std::optional<tls::TlsPem>> off = tls::LoadTlsPem({});
  ASSERT_TRUE(off.ok());
  EXPECT_FALSE(off->has_value());
  absl::StatusOr<std::optional<tls::TlsPem>> on = tls::LoadTlsPem({ca, cert, key});
  ASSERT_TRUE(on.ok()) << on.status();
  EXPECT_EQ((*on)->ca, pem);
  absl::StatusOr<std::optional<tls::TlsPem>> missing = tls::LoadTlsPem({ca, (dir_ / "nope.crt").string(), key});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("nope.crt"));
  const std::string junk = Write("junk.key", "not a key");
  absl::StatusOr<std::optional<tls::TlsPem>> bad = tls::LoadTlsPem({ca, cert, junk});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("junk.key"));
}

TEST_F(SecurityOptionsTest, SecretNeedsThirtyTwoBytes) {
  EXPECT_EQ(tls::LoadSecretFile(Write("short", std::string(31, 'x'))).status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::string bytes = std::string(32, '\0') + "\n";  // every byte counts, none trimmed
  absl::StatusOr<std::string> ok = tls::LoadSecretFile(Write("ok", bytes));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(*ok, bytes);
  EXPECT_EQ(tls::LoadSecretFile((dir_ / "absent").string()).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SecurityOptionsTest, ApiKeysFromFileAndEnvironment) {
  const std::string file = Write("keys", "# comment\n  sk-one  \n\nsk-two\r\n");
  absl::StatusOr<frontend::ApiKeys> keys = frontend::ApiKeys::Load(file, "sk-env, ,sk-env2");
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_EQ(keys->keys(), (std::vector<std::string>{"sk-one", "sk-two", "sk-env", "sk-env2"}));
  EXPECT_TRUE(keys->Authorizes("Bearer sk-one"));
  EXPECT_TRUE(keys->Authorizes("bearer sk-env2"));
  EXPECT_TRUE(keys->Authorizes("Bearer  sk-two "));
  EXPECT_FALSE(keys->Authorizes(""));
  EXPECT_FALSE(keys->Authorizes("Bearer "));
  EXPECT_FALSE(keys->Authorizes("sk-one"));
  EXPECT_FALSE(keys->Authorizes("Basic sk-one"));
  EXPECT_FALSE(keys->Authorizes("Bearer sk-on"));
  EXPECT_FALSE(keys->Authorizes("Bearer sk-one1"));

  EXPECT_FALSE(frontend::ApiKeys::Load("", "").value().enabled());
  EXPECT_TRUE(frontend::ApiKeys().Authorizes(""));  // no keys: open
  EXPECT_THAT(frontend::ApiKeys::Load(Write("empty", "# none\n"), "").status().message(), HasSubstr("holds no key"));
  EXPECT_EQ(frontend::ApiKeys::Load(Write("space", "sk one\n"), "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(frontend::ApiKeys::Load((dir_ / "absent").string(), "").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace cleave
