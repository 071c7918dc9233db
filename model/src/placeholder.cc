// Removed once the model sources land.
namespace cleave::model {}
