# fdbroker_proto_library(NAME <target> PROTOS <files...> [GRPC])
#
# Generates C++ (and, with GRPC, gRPC service) sources for the given .proto files,
# which are relative to ${PROJECT_SOURCE_DIR}/proto, and wraps them in a static
# library whose include directory is the generation root, so code includes
# "fdbroker/v1/handoff.pb.h" exactly as the proto package path reads.
function(fdbroker_proto_library)
  cmake_parse_arguments(ARG "GRPC" "NAME" "PROTOS" ${ARGN})
  set(proto_root "${PROJECT_SOURCE_DIR}/proto")
  set(out_dir "${PROJECT_BINARY_DIR}/gen")
  file(MAKE_DIRECTORY "${out_dir}")
  set(srcs)
  foreach(proto IN LISTS ARG_PROTOS)
    get_filename_component(dir "${proto}" DIRECTORY)
    get_filename_component(stem "${proto}" NAME_WE)
    set(outs "${out_dir}/${dir}/${stem}.pb.cc" "${out_dir}/${dir}/${stem}.pb.h")
    set(plugin_args)
    if(ARG_GRPC)
      list(APPEND outs "${out_dir}/${dir}/${stem}.grpc.pb.cc"
           "${out_dir}/${dir}/${stem}.grpc.pb.h")
      set(plugin_args --grpc_out=${out_dir}
          --plugin=protoc-gen-grpc=${FDBROKER_GRPC_CPP_PLUGIN})
    endif()
    add_custom_command(
      OUTPUT ${outs}
      COMMAND protobuf::protoc --proto_path=${proto_root}
              --cpp_out=${out_dir} ${plugin_args} ${proto_root}/${proto}
      DEPENDS "${proto_root}/${proto}" protobuf::protoc
      COMMENT "protoc ${proto}"
      VERBATIM)
    list(FILTER outs INCLUDE REGEX "\\.cc$")
    list(APPEND srcs ${outs})
  endforeach()
  add_library(${ARG_NAME} STATIC ${srcs})
  target_include_directories(${ARG_NAME} SYSTEM PUBLIC "${out_dir}")
  target_link_libraries(${ARG_NAME} PUBLIC protobuf::libprotobuf)
  if(ARG_GRPC)
    target_link_libraries(${ARG_NAME} PUBLIC gRPC::grpc++)
  endif()
  set_target_properties(${ARG_NAME} PROPERTIES POSITION_INDEPENDENT_CODE ON)
endfunction()
